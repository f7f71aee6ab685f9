"""Batch compression for CI: a TOML file lists models; each is compressed, checked against its gates and reported
as passed, failed (a gate is broken) or error (the run did not complete); a JSON summary and JUnit XML say so.

The file::

    [defaults]            # optional: any per-model key but path, output, report and run_dir
    kmin = 8
    limit = 1000

    [[model]]             # one table per model; its keys override [defaults]
    path = "models/a.onnx"
    data = "data/a.npz"
    scale = 255.0
    min_cr = 4.0          # gate: the report's Eq. 1 compression ratio is at least this
    max_loss = 1.0        # budget mode option, and gate: the measured loss is at most this many points

The keys of a model are the options of :class:`~axcnn.config.CompressConfig` and
:class:`~axcnn.data.Preprocess` (the same table as the compress flags, see :mod:`axcnn.options`: a new option is a
key at once) and :data:`MODEL_KEYS`. Any other key is refused by name. Relative paths are relative to the TOML
file's folder. :func:`load_plan` checks the whole file, and that the models and data exist, before any work.

This module never prints: :mod:`axcnn.cli` shows the progress and statuses.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from axcnn import __version__, atomic
from axcnn.config import CompressConfig
from axcnn.data import Preprocess
from axcnn.errors import AxcnnError, BudgetNotMet
from axcnn.options import from_mapping, option_fields

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
#: per-model keys besides the option fields
PATH_KEYS = ("path", "data", "output", "report", "run_dir")
MODEL_KEYS = (*PATH_KEYS, "output_name", "min_cr")
#: keys that name one model's own files: not allowed in [defaults]
PER_MODEL_ONLY = ("path", "output", "report", "run_dir")
STATUSES = ("passed", "failed", "error", "skipped")


@dataclass(frozen=True)
class Job:
    """One model of a batch, validated, with absolute paths."""

    index: int  # 1-based position in the file
    name: str  # the model's path as written in the file (unique within the batch)
    path: Path
    data: Path
    output: Path
    report: Path
    run_dir: Path
    output_name: str | None
    config: CompressConfig
    preprocess: Preprocess
    min_cr: float | None

    @property
    def max_loss(self) -> float | None:
        return self.config.max_loss


@dataclass(frozen=True)
class Plan:
    """A validated batch file."""

    source: Path
    jobs: tuple[Job, ...]


@dataclass(frozen=True)
class Gate:
    name: str  # "min_cr" | "max_loss"
    limit: float
    value: float | None  # None: not measured (the budget could not be met)
    passed: bool

    def describe(self) -> str:
        op = ">=" if self.name == "min_cr" else "<="
        what = "compression ratio" if self.name == "min_cr" else "loss (pp)"
        value = "not met" if self.value is None else f"{self.value:.4g}"
        return f"{self.name}: {what} {value}, needs {op} {self.limit:g}"


@dataclass(frozen=True)
class Outcome:
    """What happened to one job."""

    job: Job
    status: str  # one of STATUSES
    message: str = ""
    gates: tuple[Gate, ...] = ()
    report: dict | None = field(default=None, repr=False)
    time_s: float = 0.0


# ------------------------------------------------------------------------------------------------- the file

def _where(source: Path, table: str) -> str:
    return f"{table} of {source}"


def _option_kinds() -> dict[str, tuple[type, Any]]:
    """option name -> (owning dataclass, Option), for every option of compress."""
    out: dict[str, tuple[type, Any]] = {}
    for cls in (CompressConfig, Preprocess):
        for f, o in option_fields(cls):
            out[f.name] = (cls, o)
    return out


def _check_keys(table: Mapping[str, Any], where: str, *, defaults: bool) -> None:
    known = [*MODEL_KEYS, *_option_kinds()]
    for key in table:
        if key in PER_MODEL_ONLY and defaults:
            raise AxcnnError(f"{key!r} in {where} names one model's file; set it in each [[model]]")
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise AxcnnError(f"unknown key {key!r} in {where}{hint}; known keys: {', '.join(sorted(known))}")


def _path(value: Any, key: str, base: Path, where: str) -> Path:
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise AxcnnError(f"{key}={value!r} in {where} is invalid: allowed a path (a non-empty string, no NUL byte)")
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _number(value: Any, key: str, where: str, lo: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < lo:
        raise AxcnnError(f"{key}={value!r} in {where} is invalid: allowed a number >= {lo:g}")
    return float(value)


def _build(values: dict[str, Any], where: str, base: Path) -> dict[str, Any]:
    """Check the values of one table (keys already known) and build its option dataclasses."""
    kinds = _option_kinds()
    by_cls: dict[type, dict[str, Any]] = {CompressConfig: {}, Preprocess: {}}
    for key, value in values.items():
        if key in kinds:
            cls, o = kinds[key]
            if o.kind == "path" and value is not None:
                value = str(_path(value, key, base, where))
            by_cls[cls][key] = value
    out: dict[str, Any] = {}
    for cls, vals in by_cls.items():
        try:
            out[cls.__name__] = from_mapping(cls, vals, where)
        except (ValueError, TypeError) as exc:
            raise AxcnnError(f"{where}: {exc}") from None
    for key in PATH_KEYS:
        if key in values:
            out[key] = _path(values[key], key, base, where)
    if "output_name" in values and not isinstance(values["output_name"], str):
        raise AxcnnError(f"output_name={values['output_name']!r} in {where} is invalid: allowed a string")
    if "min_cr" in values:
        out["min_cr"] = _number(values["min_cr"], "min_cr", where, 1.0)
    return out


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and check a batch file; raise AxcnnError (one line, naming the key and the file) on any problem."""
    source = Path(path)
    try:
        raw = source.read_bytes()
    except OSError as exc:
        raise AxcnnError(f"cannot read the batch file {source}: {exc.strerror or exc}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        detail = " ".join(str(exc).split())
        raise AxcnnError(f"{source} is not valid TOML: {detail}") from None
    base = source.resolve().parent
    for key in doc:
        if key not in ("defaults", "model"):
            raise AxcnnError(f"unknown key {key!r} in {source}; a batch file holds [defaults] and [[model]] tables")
    defaults = doc.get("defaults", {})
    if not isinstance(defaults, dict):
        raise AxcnnError(f"defaults in {source} must be a table: [defaults]")
    models = doc.get("model")
    if models is None or (isinstance(models, list) and not models):
        raise AxcnnError(f"{source} lists no model: add a [[model]] table with a path")
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise AxcnnError(f"model in {source} must be an array of tables: [[model]]")

    _check_keys(defaults, _where(source, "[defaults]"), defaults=True)
    _build(defaults, _where(source, "[defaults]"), base)  # a bad default is named as such
    jobs: list[Job] = []
    for i, table in enumerate(models, 1):
        where = _where(source, f"[[model]] #{i}")
        _check_keys(table, where, defaults=False)
        if "path" not in table:
            raise AxcnnError(f"{where} has no path (the model to compress)")
        where = _where(source, f"[[model]] #{i} ({table['path']})")
        merged = {**defaults, **table}
        if "data" not in merged:
            raise AxcnnError(f"{where} has no data: set data in it or in [defaults]")
        built = _build(merged, where, base)
        jobs.append(_job(i, merged, built, base, where))
    _check_files(source, jobs)
    return Plan(source, tuple(jobs))


def _job(i: int, merged: dict, built: dict, base: Path, where: str) -> Job:
    from axcnn.api import default_run_dir

    model = built["path"]
    output = built.get("output") or base / (Path(merged["path"]).stem + ".shared.onnx")
    report = built.get("report") or output.with_name(output.name.removesuffix(".onnx") + ".report.json")
    return Job(index=i, name=str(merged["path"]), path=model, data=built["data"], output=output, report=report,
               run_dir=built.get("run_dir") or default_run_dir(output), output_name=merged.get("output_name"),
               config=built["CompressConfig"], preprocess=built["Preprocess"], min_cr=built.get("min_cr"))


def _check_files(source: Path, jobs: list[Job]) -> None:
    """Every model and data set exists; no two models write the same file; no output overwrites an input."""
    inputs: dict[Path, str] = {source.resolve(): f"the batch file {source}"}
    for job in jobs:
        where = _where(source, f"[[model]] #{job.index} ({job.name})")
        if not job.path.is_file():
            raise AxcnnError(f"path {str(job.path)!r} in {where} is not a file")
        if not job.data.exists():
            raise AxcnnError(f"data {str(job.data)!r} in {where} does not exist")
        inputs[job.path.resolve()] = inputs[job.data.resolve()] = where
    written: dict[Path, str] = {}
    for job in jobs:
        where = _where(source, f"[[model]] #{job.index} ({job.name})")
        for key, p in (("output", job.output), ("report", job.report), ("run_dir", job.run_dir)):
            r = p.resolve()
            if r in inputs:
                raise AxcnnError(f"{key} {str(p)!r} in {where} is an input of the batch; choose another path")
            if r in written:
                raise AxcnnError(f"{key} {str(p)!r} in {where} is also written by {written[r]}")
            if p.exists() and p.is_dir() != (key == "run_dir"):
                raise AxcnnError(f"{key} {str(p)!r} in {where} is a {'file' if key == 'run_dir' else 'folder'}")
            _check_creatable(p, f"{key} {str(p)!r} in {where}")
            written[r] = where
        if job.output.with_name(job.output.name + ".data").resolve() in inputs:
            raise AxcnnError(f"output {str(job.output)!r} in {where} would overwrite an input's external data")


def _check_creatable(p: Path, what: str) -> None:
    """The missing folders on the way to ``p`` can be made: the nearest existing one is a folder."""
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise AxcnnError(f"{what}: {parent} is a file, not a folder")
            return


# ------------------------------------------------------------------------------------------------- running

def gates_of(job: Job, report: Mapping[str, Any]) -> tuple[Gate, ...]:
    """The job's gates, judged on its report. The loss is the verification loss when the report has one."""
    gates = []
    if job.min_cr is not None:
        cr = float(report["compression_ratio"])
        gates.append(Gate("min_cr", job.min_cr, cr, cr >= job.min_cr))
    if job.max_loss is not None:
        loss = measured_loss(report)
        gates.append(Gate("max_loss", job.max_loss, loss, loss <= job.max_loss + 1e-9))
    return tuple(gates)


def measured_loss(report: Mapping[str, Any]) -> float:
    """The accuracy loss in points: on the held-out verification samples when the report has them."""
    verification = (report.get("evaluation") or {}).get("verification")
    if isinstance(verification, Mapping) and verification.get("accuracy_loss_pp") is not None:
        return float(verification["accuracy_loss_pp"])
    return float(report["accuracy_loss_pp"])


def run_job(job: Job, *, resume: bool = False, progress=None) -> Outcome:
    """Compress one job and judge its gates. KeyboardInterrupt propagates; every other failure is an outcome."""
    from axcnn.api import compress

    t0 = time.perf_counter()
    try:
        job.output.parent.mkdir(parents=True, exist_ok=True)
        job.report.parent.mkdir(parents=True, exist_ok=True)
        result = compress(job.path, job.data, job.output, job.report, job.config, job.preprocess, job.output_name,
                          progress, run_dir=job.run_dir, resume=resume)
    except BudgetNotMet as exc:  # the budget is a gate: not meeting it is a failure, not an error
        gate = Gate("max_loss", job.max_loss, None, False) if job.max_loss is not None else None
        return Outcome(job, "failed", str(exc), (gate,) if gate else (), None, time.perf_counter() - t0)
    except (AxcnnError, ValueError) as exc:
        return Outcome(job, "error", str(exc), (), None, time.perf_counter() - t0)
    except OSError as exc:
        return Outcome(job, "error", f"{exc.strerror or exc}: {exc.filename}", (), None, time.perf_counter() - t0)
    except Exception as exc:  # a bug: the other models still run
        log.debug("internal error on %s", job.name, exc_info=True)
        return Outcome(job, "error", f"internal error: {type(exc).__name__}: {exc}", (), None,
                       time.perf_counter() - t0)
    gates = gates_of(job, result.report)
    broken = [g for g in gates if not g.passed]
    status = "failed" if broken else "passed"
    return Outcome(job, status, "; ".join(g.describe() for g in broken), gates, result.report,
                   time.perf_counter() - t0)


def run_plan(plan: Plan, *, resume: bool = False, fail_fast: bool = False,
             progress: Callable[[Job], Any] | None = None,
             on_start: Callable[[Job], None] | None = None,
             on_done: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Run every job in order (after a failure, the rest are skipped with ``fail_fast``). ``progress(job)`` gives
    the job's compress progress callback; ``on_start``/``on_done`` are called around each job."""
    outcomes: list[Outcome] = []
    for job in plan.jobs:
        if fail_fast and any(o.status in ("failed", "error") for o in outcomes):
            outcomes.append(Outcome(job, "skipped", "not run: --fail-fast after a failure"))
            if on_done:
                on_done(outcomes[-1])
            continue
        if on_start:
            on_start(job)
        outcomes.append(run_job(job, resume=resume, progress=progress(job) if progress else None))
        if on_done:
            on_done(outcomes[-1])
    return outcomes


# ------------------------------------------------------------------------------------------------- results

def counts(outcomes: list[Outcome]) -> dict[str, int]:
    return {s: sum(o.status == s for o in outcomes) for s in STATUSES}


def summary(plan: Plan, outcomes: list[Outcome]) -> dict:
    """The batch summary as a JSON-ready dict. Jobs with no outcome (an interrupted batch) are 'skipped'."""
    done = {o.job.index: o for o in outcomes}
    all_outcomes = [done.get(j.index) or Outcome(j, "skipped", "not run: the batch was interrupted")
                    for j in plan.jobs]
    c = counts(all_outcomes)
    models = []
    for o in all_outcomes:
        rep = o.report or {}
        timing = rep.get("timing") or {}
        models.append({
            "name": o.job.name, "model": str(o.job.path), "data": str(o.job.data), "output": str(o.job.output),
            "report": str(o.job.report), "status": o.status, "message": o.message,
            "gates": [{"gate": g.name, "limit": g.limit, "value": g.value, "passed": g.passed} for g in o.gates],
            "compression_ratio": rep.get("compression_ratio"),
            "accuracy_loss_pp": measured_loss(rep) if rep else None,
            "candidates_scored": timing.get("candidates_scored"),
            "candidates_resumed": timing.get("candidates_resumed"),
            "time_s": round(o.time_s, 3),
        })
    return {"schema_version": SCHEMA_VERSION, "tool": {"name": "axcnn", "version": __version__},
            "config": str(plan.source), "ok": c["failed"] == 0 and c["error"] == 0 and c["skipped"] == 0,
            **c, "time_s": round(sum(o.time_s for o in outcomes), 3), "models": models}


def junit_xml(plan: Plan, outcomes: list[Outcome]) -> str:
    """JUnit XML: one testcase per model; a broken gate is a <failure>, a run that did not complete an <error>."""
    s = summary(plan, outcomes)
    suite_attrs = {"name": f"axcnn batch {plan.source.name}", "tests": str(len(plan.jobs)),
                   "failures": str(s["failed"]), "errors": str(s["error"]), "skipped": str(s["skipped"]),
                   "time": f"{s['time_s']:.3f}"}
    root = ET.Element("testsuites", suite_attrs)
    suite = ET.SubElement(root, "testsuite", suite_attrs)
    classname = "axcnn.batch." + plan.source.stem
    for m in s["models"]:
        case = ET.SubElement(suite, "testcase", {"classname": classname, "name": m["name"],
                                                 "time": f"{m['time_s']:.3f}"})
        if m["status"] == "failed":
            el = ET.SubElement(case, "failure", {"message": m["message"], "type": "gate"})
            el.text = "\n".join(f"{g['gate']}: value {g['value']}, limit {g['limit']}, "
                                f"{'passed' if g['passed'] else 'broken'}" for g in m["gates"]) or m["message"]
        elif m["status"] == "error":
            ET.SubElement(case, "error", {"message": m["message"], "type": "error"}).text = m["message"]
        elif m["status"] == "skipped":
            ET.SubElement(case, "skipped", {"message": m["message"]})
        if m["status"] in ("passed", "failed") and m["compression_ratio"] is not None:
            ET.SubElement(case, "system-out").text = (
                f"output: {m['output']}\nreport: {m['report']}\ncompression ratio (Eq. 1): "
                f"{m['compression_ratio']:.4f}\naccuracy loss: {m['accuracy_loss_pp']} pp\n")
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_results(plan: Plan, outcomes: list[Outcome], summary_path: Path | None, junit_path: Path | None) -> None:
    """Write the summary and the JUnit file (each atomically, their folders made if missing) where asked. Raises
    AxcnnError when one cannot be written."""
    if summary_path is not None:
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(summary_path, json.dumps(summary(plan, outcomes), indent=2) + "\n")
    if junit_path is not None:
        junit_path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(junit_path, junit_xml(plan, outcomes))


def check_result_path(path: Path, what: str, plan: Plan) -> None:
    """Refuse a summary/JUnit path that is a folder, below a file, or that a job reads or writes."""
    if "\0" in str(path):
        raise AxcnnError(f"the {what} path {path!r} holds a NUL byte")
    if path.exists() and path.is_dir():
        raise AxcnnError(f"the {what} path {path} is a folder")
    _check_creatable(path.absolute(), f"the {what} path {path}")
    taken = {p.resolve() for j in plan.jobs for p in (j.path, j.data, j.output, j.report)} | {plan.source.resolve()}
    if path.resolve() in taken:
        raise AxcnnError(f"the {what} path {path} is a file of the batch; choose another path")
