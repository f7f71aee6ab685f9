"""End to end on real third-party models and real test sets (../shared/realdata; skipped when absent).

Each case compresses one model (through the CLI, or the library for one case) on a seeded, label-stratified subset
and then checks the written file without trusting the report: onnx.checker (full_check), an onnxruntime session
of our own on the written file, our own preprocessing of the npz per the manifest, top-1 on an independent subset,
the report's scores reproduced on the exact subset the compress run used, and equality with a dense model made from
the decoded weights (rewrite.expand).

Runtime: about 30-60 s on 2 cores (the compress runs take 1-5 s each; the rest is onnxruntime inference).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import REALDATA, realdata_manifest

from axcnn import rewrite
from axcnn.api import compress
from axcnn.cli import main
from axcnn.config import CompressConfig
from axcnn.data import Preprocess, stratified_subset

pytestmark = pytest.mark.realdata

SEED = 0  # the compress runs use the default seed (0): their subset is stratified_subset(y, limit, 0)
EVAL_SEED = 20240611  # our own evaluation subset, disjoint from the compress subset
K_FLAGS = ["--kmin", "40", "--kmax", "80", "--filter", "0.15"]


@dataclass(frozen=True)
class Case:
    limit: int  # samples the compress run scores candidates on
    eval_n: int | None  # samples of our independent check (None: every sample outside the compress subset)
    via: str = "cli"  # "cli" (click's CliRunner) or "api" (axcnn.api.compress)


CASES = {
    # plain PyTorch export, dynamic batch: the full exploration size of the acceptance run
    "mnist_cnn_baskov": Case(limit=1000, eval_n=None),
    # IR 4, NHWC, initializers that are also graph inputs
    "mnist_cnn_tf2onnx_ir4": Case(limit=300, eval_n=None),
    # weights in an external data file: the output must be written with external data too
    "mnist_external_data": Case(limit=300, eval_n=None),
    # opset 8 (no int32 MatMul: the ReduceSum decode), IR 3, batch fixed to 1; through the library API
    "mnist8_zoo": Case(limit=300, eval_n=None, via="api"),
    # CIFAR-10, batch fixed to 1 (one onnxruntime call per image: keep the check subset at 3000)
    "cifar10_resnet8_tiny": Case(limit=300, eval_n=3000),
}


# ------------------------------------------------------------------------------------------------ helpers


@cache
def _manifest() -> dict:
    return realdata_manifest()


@cache
def _raw(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    info = _manifest()["datasets"][dataset]
    with np.load(REALDATA / info["file"]) as npz:
        x, y = npz["x"], npz["y"].astype(np.int64)
    assert len(x) == len(y) == info["n"]
    return x, y


def _preprocess(x: np.ndarray, entry: dict) -> np.ndarray:
    """The manifest's recipe, written out independently of axcnn.data: (x / scale - mean) / std, then layout."""
    x = x.astype(np.float32)
    if x.ndim == 3:
        x = x[..., None]
    x = x / np.float32(entry["scale"])
    x = (x - np.asarray(entry["mean"], np.float32)) / np.asarray(entry["std"], np.float32)
    if entry["layout"] == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=np.float32)


def _session(path: Path | bytes):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    src = path if isinstance(path, bytes) else str(path)  # a path, so that external data is found beside it
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def _outputs(sess, x: np.ndarray, batch: int = 500) -> np.ndarray:
    """The first output over ``x``, [n, classes]; a model with a fixed batch dimension gets batches of that size."""
    inp = sess.get_inputs()[0]
    dim0 = inp.shape[0]
    bs = dim0 if isinstance(dim0, int) and dim0 > 0 else batch
    out_name = sess.get_outputs()[0].name
    outs = [sess.run([out_name], {inp.name: x[i:i + bs]})[0] for i in range(0, len(x), bs)]
    return np.concatenate(outs).reshape(len(x), -1)


def _files_bytes(path: Path) -> int:
    """A model file plus the external data files it references."""
    model = onnx.load(str(path), load_external_data=False)
    locations = {e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)


@dataclass
class Run:
    name: str
    entry: dict
    case: Case
    original: Path
    output: Path
    report: dict
    y: np.ndarray  # labels of the full test set
    x: np.ndarray  # our own preprocessing of the samples in ``idx``
    idx: np.ndarray  # indices into the full test set: the compress subset, then our evaluation subset
    explore: np.ndarray  # positions in ``idx`` of the compress subset
    check: np.ndarray  # positions in ``idx`` of our independent evaluation subset
    pred_original: np.ndarray  # top-1 of the original model on ``x``
    pred_shared: np.ndarray  # top-1 of the written model on ``x``


def _compress(name: str, entry: dict, case: Case, data: Path, out: Path, rep: Path) -> dict:
    original = REALDATA / entry["file"]
    if case.via == "api":
        config = CompressConfig(kmin=40, kmax=80, filter=0.15, limit=case.limit, seed=SEED)
        pre = Preprocess(scale=entry["scale"], mean=tuple(entry["mean"]), std=tuple(entry["std"]),
                         layout=entry["layout"])
        return compress(original, data, out, rep, config, pre).report
    args = ["compress", str(original), "--data", str(data), "--scale", repr(entry["scale"]),
            "--mean", ",".join(map(repr, entry["mean"])), "--std", ",".join(map(repr, entry["std"])),
            "--layout", entry["layout"], *K_FLAGS, "--limit", str(case.limit), "-o", str(out), "--report", str(rep),
            "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, f"{name}: compress failed ({result.exit_code}): {result.output}"
    return json.loads(rep.read_text())


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def run(request, tmp_path_factory) -> Run:
    name = request.param
    manifest = _manifest()
    entry, case = manifest["models"][name], CASES[name]
    data = REALDATA / manifest["datasets"][entry["dataset"]]["file"]
    folder = tmp_path_factory.mktemp(name)
    out, rep = folder / f"{name}.shared.onnx", folder / f"{name}.report.json"
    report = _compress(name, entry, case, data, out, rep)

    x_raw, y = _raw(entry["dataset"])
    explore_idx = stratified_subset(y, case.limit, SEED)
    rest = np.setdiff1d(np.arange(len(y)), explore_idx)
    if case.eval_n is not None and case.eval_n < len(rest):
        rest = np.sort(np.random.default_rng(EVAL_SEED).choice(rest, case.eval_n, replace=False))
    idx = np.concatenate([explore_idx, rest])
    x = _preprocess(x_raw[idx], entry)
    return Run(
        name=name, entry=entry, case=case, original=REALDATA / entry["file"], output=out, report=report, y=y,
        x=x, idx=idx, explore=np.arange(len(explore_idx)), check=np.arange(len(explore_idx), len(idx)),
        pred_original=_outputs(_session(REALDATA / entry["file"]), x).argmax(1),
        pred_shared=_outputs(_session(out), x).argmax(1),
    )


# -------------------------------------------------------------------------------------------------- tests


def test_written_model_passes_checker_and_loads(run: Run):
    onnx.checker.check_model(str(run.output), full_check=True)  # a path: external data and full shape inference
    model = onnx.load(str(run.output), load_external_data=False)
    assert rewrite.is_shared_model(model)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if run.name == "mnist_external_data":
        # the input keeps its weights in an external file, so the output does too, beside it, by a bare name that
        # is unique to its content (so replacing an older output never pairs a model with another's data)
        locations = {{e.key: e.value for e in t.external_data}["location"] for t in external}
        assert external and len(locations) == 1
        (location,) = locations
        assert re.fullmatch(re.escape(run.output.name) + r"\.[0-9a-f]{12}\.data", location)
        assert (run.output.parent / location).is_file()
    else:
        assert not external
    # the decode subgraph folds away: the session's input and outputs are those of the original model
    sess, ref = _session(run.output), _session(run.original)
    assert [(i.name, i.shape) for i in sess.get_inputs()] == [(i.name, i.shape) for i in ref.get_inputs()]
    assert [o.name for o in sess.get_outputs()] == [o.name for o in ref.get_outputs()]


def test_report_scores_match_our_own_run_on_the_compress_subset(run: Run):
    rep, n = run.report, run.case.limit
    assert rep["samples"] == n
    labels = run.y[run.idx[run.explore]]
    own_final = int(np.sum(run.pred_shared[run.explore] == labels))
    own_reference = int(np.sum(run.pred_original[run.explore] == labels))
    # same samples, same file, same runtime: the counts must agree exactly
    assert rep["final_score"] * n == pytest.approx(own_final, abs=1e-6)
    assert rep["reference_score"] * n == pytest.approx(own_reference, abs=1e-6)
    assert rep["accuracy_loss_pp"] == pytest.approx((own_reference - own_final) / n * 100, abs=1e-4)


def test_accuracy_on_an_independent_subset(run: Run):
    labels = run.y[run.idx[run.check]]
    n = len(labels)
    ok_orig = run.pred_original[run.check] == labels
    ok_shared = run.pred_shared[run.check] == labels
    acc_orig, acc_shared = ok_orig.mean(), ok_shared.mean()

    # 1. our preprocessing reproduces the manifest's reference: the original's accuracy on n of N samples drawn
    #    without replacement has sd sqrt(p(1-p)/n * (N-n)/(N-1)); 4 sd plus 0.05 pp for runtime numerics.
    ref, total = run.entry["reference_top1"], len(run.y)
    sd_ref = math.sqrt(ref * (1 - ref) / n * (total - n) / (total - 1))
    assert abs(acc_orig - ref) <= 4 * sd_ref + 5e-4, (run.name, acc_orig, ref)

    # 2. the shared model loses at most ~1 pp against the original measured the same way, on the same samples.
    #    The paired difference acc_orig - acc_shared only moves on samples where exactly one of the two models is
    #    right (a fraction d): its sd is at most sqrt(d / n). We allow 1 pp plus 3 such sd, so a model whose true
    #    loss is 1 pp fails by chance with probability < 0.2 % (one-sided). With n = 9000 or 9700 and d ~ 1 % the
    #    slack is ~0.3 pp; with n = 3000 and d ~ 3 % (CIFAR-10 ResNet-8) it is ~1 pp.
    d = float(np.mean(ok_orig != ok_shared))
    slack = 3 * math.sqrt(max(d, 1 / n) / n)
    loss_pp = (acc_orig - acc_shared) * 100
    assert loss_pp <= 1.0 + slack * 100, f"{run.name}: {loss_pp:.2f} pp lost on {n} samples (slack {slack:.4f})"


def test_report_compression_and_file_sizes(run: Run):
    rep = run.report
    assert rep["compression_ratio"] > 1
    assert rep["eq1_bits_after"] < rep["eq1_bits_before"]
    # measured on disk (model file plus external data files): the written model is smaller than the input
    before, after = _files_bytes(run.original), _files_bytes(run.output)
    assert after < before
    # and the report gives those same sizes
    assert rep["file_bytes_after"] == after
    assert rep["file_bytes_before"] == before
    assert rep["file_bytes_after"] < rep["file_bytes_before"]
    # per layer, what is stored is Eq. 1 (indices + centroids) to within byte rounding and plane padding
    for layer in rep["layers"]:
        eq1 = layer["weights"] * layer["index_bits"] + layer["k"] * layer["bits"]
        assert layer["stored_bytes"] <= 1.02 * eq1 / 8 + 16, layer["name"]


def test_shared_model_equals_dense_model_with_decoded_weights(run: Run):
    shared = onnx.load(str(run.output))  # with its external data
    records = {r["name"]: r for r in rewrite.shared_layers(shared)}
    assert {layer["name"] for layer in run.report["layers"]} == set(records)
    decoded = rewrite.decode(shared)
    for layer in run.report["layers"]:
        w = decoded[layer["name"]]
        assert list(w.shape) == layer["shape"] and records[layer["name"]]["k"] == layer["k"]
        assert len(np.unique(w)) <= layer["k"]

    dense = rewrite.expand(shared)
    assert not rewrite.is_shared_model(dense)
    assert not any(node.name.startswith(rewrite.NODE_PREFIX) for node in dense.graph.node)
    onnx.checker.check_model(dense, full_check=True)
    x = run.x[run.check[:100]]
    got = _outputs(_session(run.output), x)
    want = _outputs(_session(dense.SerializeToString()), x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and the decoded weights are not the original ones: sharing did change the model
    orig = _outputs(_session(run.original), x)
    assert not np.allclose(orig, got, rtol=1e-5, atol=1e-5)
