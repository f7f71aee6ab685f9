"""The library entry point: ``compress`` runs the whole pipeline, as the CLI does."""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from axcnn import __version__, affine, atomic, fold, report, rewrite, score
from axcnn import data as data_mod
from axcnn.config import CompressConfig
from axcnn.data import Dataset, Preprocess, stratified_subset
from axcnn.errors import AxcnnError, BudgetNotMet
from axcnn.executor import make_executor
from axcnn.explore import Explorer, Progress
from axcnn.journal import Journal, fingerprint
from axcnn.model import inventory, io_info, load_model, uses_external_data
from axcnn.search.budget import run_budget
from axcnn.search.greedy import greedy
from axcnn.search.pareto import run_pareto

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    output_path: Path
    report_path: Path | None
    report: dict = field(repr=False)


#: settings the results do not depend on: a run stopped on one executor resumes on another
_NOT_IN_FINGERPRINT = ("data", "executor", "ray_address")


def default_output(model_path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.shared.onnx`` in the current directory (the input's folder may be read-only)."""
    return Path(Path(model_path).stem + ".shared.onnx")


def default_run_dir(output_path: str | os.PathLike) -> Path:
    """Where a run keeps its journal unless told: beside the output, ``out/m.shared.onnx`` -> ``out/m.shared.run``."""
    p = Path(output_path)
    return p.with_name(p.name.removesuffix(".onnx") + ".run")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def model_files(path: Path, model: onnx.ModelProto) -> list[Path]:
    """The model file and the external data files it references."""
    files = [path]
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc and (path.parent / loc) not in files:
                files.append(path.parent / loc)
    return files


def check_output_path(model_path: Path, target: Path, what: str, data_path: Path | None = None) -> None:
    """Refuse an output path that is the input model (or its external data) or data, a folder, or in a missing
    folder."""
    inputs = [model_path]
    if model_path.is_file():
        try:
            inputs = model_files(model_path, onnx.load(str(model_path), load_external_data=False))
        except Exception:  # an unreadable model is reported by load_model later
            pass
    if data_path is not None and (_same_file(target, data_path) or target.resolve() == Path(data_path).resolve()):
        raise AxcnnError(f"the {what} path {target} is the input data; choose another path")
    # a model output may bring its external data file, OUTPUT.data: it must not replace the input's either
    companion = target.with_name(target.name + ".data") if what == "output" else None
    for src in inputs:
        if _same_file(target, src) or target.resolve() == src.resolve():
            raise AxcnnError(f"the {what} path {target} is the input model; choose another path")
        if companion is not None and (_same_file(companion, src) or companion.resolve() == src.resolve()):
            raise AxcnnError(f"the {what} path {target} would write its external data over the input's {src}; "
                             "choose another path")
    if target.exists() and target.is_dir():
        raise AxcnnError(f"the {what} path {target} is a directory")
    if not target.resolve().parent.is_dir():
        raise AxcnnError(f"the folder of the {what} path {target} does not exist")


#: settings that say where and how this machine ran, not what was written: kept in the report, not in the model
LOCAL_SETTINGS = ("data", "front_dir", "device", "executor", "ray_address", "cache_mb", "batch_size")


def model_settings(settings: dict) -> str:
    """The run's settings as stored in the written model (``axcnn.settings``): compact JSON of those that shape the
    result and are set. A model travels to devices and other people: it need not carry this machine's paths and
    tuning, and on small models every byte shows in the file's ratio. The report keeps every setting."""
    kept = {k: v for k, v in settings.items() if v is not None and k not in LOCAL_SETTINGS}
    return json.dumps(kept, sort_keys=True, separators=(",", ":"))


def _check_paths(model_path: Path, output: Path, report_path: Path | None, data_path=None) -> None:
    data = Path(data_path) if data_path is not None else None
    check_output_path(model_path, output, "output", data)
    if report_path is not None:
        check_output_path(model_path, report_path, "report", data)
    if report_path is not None and output.resolve() == report_path.resolve():
        raise AxcnnError("the output model and the report must be different files")


def load_data(data_path, preprocess: Preprocess, io, config: CompressConfig, model_path=None) -> Dataset:
    """The scoring data, ready to feed the model: read, preprocessed and cut to ``config.limit`` samples.

    ``data_path`` is an ``.npz``, an image folder or a zoo test folder; None looks for ``test_data_set_*`` folders
    beside ``model_path`` and, finding none, makes synthetic inputs (a data-free run; ``config.limit`` of them,
    1000 by default). See :mod:`axcnn.data`.
    """
    source = data_mod.find_source(data_path, model_path)
    data = data_mod.load(source, preprocess, io, limit=config.limit, seed=config.seed)
    prov = data.provenance
    if source.kind == "synthetic":
        log.warning("no test data: neither --data nor test_data_set_* folders beside the model; running data-free "
                    "on %d synthetic inputs, scored by agreement with the original model (accuracy is not "
                    "measured)", len(data))
    elif source.kind == "zoo":
        how = "found beside the model" if source.found else "given"
        log.warning("zoo test data %s (%d sets, %d samples) has no labels: scoring by agreement with the original "
                    "model's top-1 (--metric agreement)", how, len(source.sets), prov.read)
    elif not data.labelled:
        log.warning("the test data %s has no labels: scoring by agreement with the original model's top-1 "
                    "(--metric agreement)", data_path)
    return data


def data_config(config: CompressConfig, data: Dataset) -> CompressConfig:
    """The config scoring ``data`` runs with: unlabelled data is scored by agreement. Budget modes need labels."""
    if data.labelled:
        return config
    if config.mode != "greedy":
        raise AxcnnError(_BUDGET_NEEDS_LABELS + _why_unlabelled(data.provenance.source if data.provenance else None))
    return config if config.metric == "agreement" else replace(config, metric="agreement")


_BUDGET_NEEDS_LABELS = "--max-loss and --target-cr need labelled test data (--data with labels): "


def _why_unlabelled(kind: str | None) -> str:
    return {"synthetic": "this run has no test data (data-free)",
            "zoo": "zoo test sets have no labels"}.get(kind, "the test data has no labels")


def split(data, config: CompressConfig):
    """(selection, verification or None): ``config.holdout`` of the samples, seeded and label-stratified, are held
    out to verify the result on samples the search never saw."""
    n_ver = int(round(config.holdout * len(data)))
    if n_ver < 1:
        return data, None
    if n_ver >= len(data):
        raise AxcnnError(f"--holdout {config.holdout:g} leaves no samples to search with ({len(data)} in all)")
    strata = data.y if data.y is not None else np.zeros(len(data), np.int64)  # unlabelled: a plain random draw
    ver = stratified_subset(strata, n_ver, config.seed + 7919)
    mask = np.ones(len(data), dtype=bool)
    mask[ver] = False
    return data.subset(np.flatnonzero(mask)), data.subset(ver)


def _agreement_labels(model, runner, io, x, batch) -> np.ndarray:
    out = np.concatenate(list(score.run_model(model, runner, io, x, batch)), axis=0)
    return np.argmax(out.reshape(len(out), -1), axis=1).astype(np.int64)


def _selection_eval(explorer, final_correct: int) -> dict:
    n = len(explorer.labels)
    return {"samples": n, "reference_score": explorer.reference_correct / n, "final_score": final_correct / n,
            "accuracy_loss_pp": round(100.0 * (explorer.reference_correct - final_correct) / n, 6)}


def compress(
    model_path: str | os.PathLike,
    data_path: str | os.PathLike | None = None,
    output_path: str | os.PathLike | None = None,
    report_path: str | os.PathLike | None = None,
    config: CompressConfig | None = None,
    preprocess: Preprocess | None = None,
    output_name: str | None = None,
    progress: Progress | None = None,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
) -> Result:
    """Weight-share ``model_path`` using the test data ``data_path`` and write the shared model.

    ``data_path`` is an ``.npz``, an image folder or a zoo test folder; None uses the ``test_data_set_*`` folders
    beside the model, or synthetic inputs when there are none (data-free: scored by agreement with the original
    model, and the report says ``accuracy_measured: false``). Unlabelled data is scored by agreement.

    Returns the report (also written as JSON to ``report_path`` when given). Raises AxcnnError for user errors;
    the output and the report are then not written.

    Every scored candidate and every fixed layer is journaled in ``run_dir`` (default: :func:`default_run_dir`)
    as it happens. ``resume=True`` continues the journal left there by a run that was stopped: nothing scored
    then is scored again, and the output is the same, byte for byte, as that of a run never stopped. See
    :mod:`axcnn.journal`.
    """
    t_start = time.perf_counter()
    config = config or CompressConfig()
    preprocess = preprocess or Preprocess()
    model_path = Path(model_path)
    output = Path(output_path) if output_path is not None else default_output(model_path)
    report_file = Path(report_path) if report_path is not None else None
    _check_paths(model_path, output, report_file, data_path)

    if config.mode != "greedy":  # budget modes need labels; say so before reading anything
        source = data_mod.find_source(data_path, model_path)
        if source.kind in ("synthetic", "zoo"):
            raise AxcnnError(_BUDGET_NEEDS_LABELS + _why_unlabelled(source.kind))
    model = load_model(model_path)
    if config.fold_bn:
        model, folded = fold.fold_bn(model)
        log.info("--fold-bn: folded %d node(s) into %d layer(s)", sum(len(f.folded) for f in folded), len(folded))
    io = io_info(model, output_name)
    layers, skipped = inventory(model, config.min_weights)
    if not layers:
        raise AxcnnError(f"{model_path} has no Conv/ConvTranspose/Gemm/MatMul weight with at least "
                         f"{config.min_weights} values to share")
    data = load_data(data_path, preprocess, io, config, model_path)
    config = data_config(config, data)
    selection, verification = split(data, config)
    settings = report.settings_dict(config, preprocess, data_path, len(data), io)
    skeleton = onnx.load(str(model_path), load_external_data=False)  # tensors still point at their files
    # the journal's fingerprint: what the results depend on (the data by content, not by path)
    run_fp = fingerprint(model_files=model_files(model_path, skeleton),
                         arrays=(data.x, None if config.metric == "agreement" else data.y),
                         settings={k: v for k, v in settings.items() if k not in _NOT_IN_FINGERPRINT},
                         version=__version__)
    try:
        with Journal.open(run_dir if run_dir is not None else default_run_dir(output), run_fp, resume) as journal:
            result = _run(model_path, model, skeleton, io, layers, skipped, data, selection, verification, output,
                          report_file, config, settings, progress, journal, t_start)
            journal.finish()
    except OSError as exc:  # a full disk, no permission: the environment, not a bug (the journal is kept)
        where = f"cannot write {exc.filename}: " if exc.filename else ""
        raise AxcnnError(f"{where}{exc.strerror or exc}") from None
    return result


def shared_model(model: onnx.ModelProto, decisions, metadata: dict) -> tuple[onnx.ModelProto, list, list]:
    """The weight-shared model of ``decisions`` (repairs applied), its stored layers and SharedWeights; the decode
    is checked in memory."""
    base = model
    repaired = [d for d in decisions if d.repair is not None]
    if repaired:
        base = copy.deepcopy(model)
        for d in repaired:
            affine.apply_channel_affine(base, d.spec.name, d.repair[0], d.repair[1])
    shared = [d.shared().shared_weight(d.spec.name) for d in decisions]
    out_model, stored = rewrite.share_weights(base, shared, metadata)
    rewrite.verify(out_model, shared)
    return out_model, stored, shared


def write_front(points, folder: Path, model: onnx.ModelProto, metadata: dict, skeleton) -> list[dict]:
    """Write every front point's model into ``folder`` (created if missing) as ``cr{ratio}_loss{pp}.onnx``, each
    checked to decode exactly once read back, and ``front.json`` listing them; returns that list."""
    if folder.exists() and not folder.is_dir():
        raise AxcnnError(f"--front-dir {folder} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    listing = []
    for p in sorted((p for p in points if not p.dominated), key=lambda p: p.compression_ratio):
        out_model, _, shared = shared_model(model, p.decisions, metadata)
        path = folder / f"cr{p.compression_ratio:.2f}_loss{p.loss_pp:.2f}.onnx"
        external = uses_external_data(skeleton) or out_model.ByteSize() > (2 << 30) - (1 << 20)
        size = rewrite.write_model(out_model, path, external_data=external)
        rewrite.verify(load_model(path), shared)
        listing.append({"file": path.name, "bytes": size, "compression_ratio": p.compression_ratio,
                        "accuracy_loss_pp": p.loss_pp, "measured_on": p.measured_on,
                        "layers": {d.spec.name: d.clustering.k for d in p.decisions}})
    atomic.write_text(folder / "front.json", json.dumps(listing, indent=2) + "\n")
    return listing


def _run(model_path, model, skeleton, io, layers, skipped, data, selection, verification, output, report_file,
         config, settings, progress, journal, t_start) -> Result:
    providers = score.select_providers(config.device)
    labels = None if config.metric == "agreement" else selection.y
    executor = make_executor(config)  # where the search's scoring tasks run; closed once the search is done
    try:
        explorer = Explorer(model, io, selection.x, labels, config, providers, progress=progress, journal=journal,
                            executor=executor)
        data_info = data.provenance.as_dict(len(data)) if data.provenance else {"samples": len(data)}
        if selection.reference is not None:  # zoo output_0.pb: the original model's top-1 as stored with the data
            own = explorer.reference_outputs.reshape(len(selection), -1).argmax(axis=1)
            same = int(np.sum(own == selection.reference))
            data_info["stored_outputs_agree"] = same
            if same < len(selection):
                log.warning("the model's top-1 differs from the stored output_0.pb on %d of %d samples",
                            len(selection) - same, len(selection))
        ver_labels = None
        if verification is not None:
            ver_labels = verification.y if config.metric != "agreement" else _agreement_labels(
                model, explorer.runner, io, verification.x, config.batch_size)
        held_out = None if verification is None else (verification.x, ver_labels)
        points = None
        if config.mode == "greedy":
            exploration = greedy(explorer, layers)
            section: dict = {"mode": "greedy"}
        elif config.mode == "pareto":
            exploration, section, points = run_pareto(explorer, layers, config, held_out, progress)
        else:
            exploration, section = run_budget(explorer, layers, config, held_out, progress)
    finally:
        executor.close()
    if not exploration.decisions:
        raise AxcnnError("no layer could be shared: " + "; ".join(f"{n}: {r}" for n, r in exploration.skipped))

    # write the weight-shared model, check its decode, and score the written file itself
    metadata = {"axcnn.version": __version__, "axcnn.settings": model_settings(settings)}
    out_model, stored, shared = shared_model(model, exploration.decisions, metadata)
    if points is not None and config.front_dir is not None:
        section["front_dir"] = write_front(points, Path(config.front_dir), model, metadata, skeleton)
    external = uses_external_data(skeleton) or out_model.ByteSize() > (2 << 30) - (1 << 20)
    t_final = time.perf_counter()
    try:
        file_bytes_after = rewrite.write_model(out_model, output, external_data=external)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(output)) from exc
    written = load_model(output)
    try:
        rewrite.verify(written, shared)  # the file on disk, not just the model in memory, decodes exactly
        final_correct = score.count_all(written, explorer.runner, io, selection.x, explorer.labels, config.metric,
                                        config.batch_size)
        evaluation = {"selection": _selection_eval(explorer, final_correct), "verification": None}
        if verification is not None:
            ref_mask = score.correct_mask(model, explorer.runner, io, verification.x, ver_labels, config.metric,
                                          config.batch_size)
            out_mask = score.correct_mask(written, explorer.runner, io, verification.x, ver_labels, config.metric,
                                          config.batch_size)
            evaluation["verification"] = score.paired_loss(ref_mask, out_mask)
            if config.max_loss is not None and evaluation["verification"]["accuracy_loss_pp"] > config.max_loss:
                raise BudgetNotMet(f"the written model loses {evaluation['verification']['accuracy_loss_pp']:.2f} "
                                   f"pp on the verification samples, over --max-loss {config.max_loss:g}")
    except Exception as exc:
        for f in model_files(output, onnx.load(str(output), load_external_data=False)):
            f.unlink(missing_ok=True)
        if isinstance(exc, AxcnnError):
            raise
        raise AxcnnError(f"the written file {output} does not decode to the clustered weights "
                         f"({type(exc).__name__}: {exc}); it was removed") from exc
    final_s = time.perf_counter() - t_final
    file_bytes_before = sum(f.stat().st_size for f in model_files(model_path, skeleton))

    rep = report.build(
        model_path=model_path, output_path=output, settings=settings, exploration=exploration,
        skipped=skipped, stored=stored, final_correct=final_correct, out_model=out_model, original=model,
        file_bytes_before=file_bytes_before, file_bytes_after=file_bytes_after,
        final_check_s=final_s, total_s=time.perf_counter() - t_start, providers=providers,
        section=section, evaluation=evaluation, candidates_resumed=explorer.candidates_resumed,
        executor=executor.describe(),
    )
    rep["data"] = data_info
    rep["accuracy_measured"] = data.labelled
    if report_file is not None:
        try:
            report.write_json(rep, report_file)
        except (OSError, AxcnnError):  # no model without its report: remove the one just written
            for f in model_files(output, onnx.load(str(output), load_external_data=False)):
                f.unlink(missing_ok=True)
            raise
    return Result(output, report_file, rep)
