"""Benchmarks of axcnn on a real model: design-space exploration, clustering speed, inference latency, memory.

    python bench/run.py [--model cifar10_resnet20] [--limit N] [--kmin 40 --kmax 80 --filter 0.15] [--calib 256]
                        [--only all|clustering|latency|dse] [--write-docs] [--json OUT]

Prints one table per section. Writes nothing into the repository unless ``--write-docs`` is given (it then
rewrites the figures section of docs/benchmarks.md); compressed models go to a temporary folder. The real models
and data are read from ``<repo>/../shared/realdata``. See docs/benchmarks.md for what each section measures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
try:
    import axcnn  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(REPO))
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from baseline import candidates_to_score, paper_dse, session_options, without_initializer_inputs  # noqa: E402

from axcnn import rewrite  # noqa: E402
from axcnn.api import compress  # noqa: E402
from axcnn.cluster import cluster_range  # noqa: E402
from axcnn.config import CompressConfig  # noqa: E402
from axcnn.data import Preprocess, load_npz, prepare, stratified_subset  # noqa: E402
from axcnn.model import inventory, io_info, load_model  # noqa: E402

REALDATA = REPO.parent / "shared" / "realdata"
DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"
BUDGET_BEGIN, BUDGET_END = "<!-- budget:begin -->", "<!-- budget:end -->"
BATCH = 256  # onnxruntime batch size of every scoring pass (axcnn's default)
SEED = 0

# The 21 conv/fc weight shapes of torchvision's ResNet-18 (11,678,912 weights).
RESNET18 = [("conv1", (64, 3, 7, 7))]
for _i in range(2):
    RESNET18 += [(f"layer1.{_i}.conv1", (64, 64, 3, 3)), (f"layer1.{_i}.conv2", (64, 64, 3, 3))]
for _stage, (_c, _p) in enumerate(((128, 64), (256, 128), (512, 256)), start=2):
    RESNET18 += [(f"layer{_stage}.0.conv1", (_c, _p, 3, 3)), (f"layer{_stage}.0.conv2", (_c, _c, 3, 3)),
                 (f"layer{_stage}.0.downsample", (_c, _p, 1, 1)),
                 (f"layer{_stage}.1.conv1", (_c, _c, 3, 3)), (f"layer{_stage}.1.conv2", (_c, _c, 3, 3))]
RESNET18.append(("fc", (1000, 512)))
# (layer, K) pairs timed with scikit-learn; the rest is extrapolated from them
SKLEARN_SAMPLE_LAYERS = ("conv1", "layer2.1.conv1", "layer4.1.conv2")
SKLEARN_SAMPLE_KS = (40, 60, 80)


# ---------------------------------------------------------------------------------------------------------------
# output


class Out:
    """Prints lines and keeps them for docs/benchmarks.md."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def table(self, title: str, headers: list[str], rows: list[list[str]], notes: list[str] = ()) -> None:
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

        def line(cells: list[str]) -> str:
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                                   strict=True)))

        self("")
        self(f"## {title}")
        self(line(headers))
        self("  ".join("-" * w for w in widths))
        for r in rows:
            self(line(r))
        for n in notes:
            self(n)


def note(msg: str) -> None:
    """Progress messages: stderr, not part of the tables."""
    print(msg, file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def phase_stats() -> tuple[float, float]:
    """(peak RSS in MB so far, 1-minute load average now)."""
    return peak_rss_mb(), os.getloadavg()[0]


class Window:
    """Wall and CPU seconds of a block (CPU: all threads of this process), and the machine's mean 1-minute load
    average during it (sampled every 5 s)."""

    def __enter__(self) -> Window:
        self.loads = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(5.0):
            self.loads.append(os.getloadavg()[0])

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0
        self._stop.set()
        self._thread.join()
        self.loads.append(os.getloadavg()[0])
        self.load = statistics.mean(self.loads)


def fmt_ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


# ---------------------------------------------------------------------------------------------------------------
# machine and set-up


def machine() -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram_gb = int(line.split()[1]) / 1024**2
    except OSError:
        pass
    import numba
    import sklearn

    return {
        "cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "ram_gb": round(ram_gb, 1) if ram_gb else None, "python": platform.python_version(),
        "numpy": np.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__,
        "numba": numba.__version__, "sklearn": sklearn.__version__, "loadavg_start": os.getloadavg(),
    }


class Setup:
    """The model, its preprocessing and the scoring set, prepared exactly as ``compress`` prepares them."""

    def __init__(self, args: argparse.Namespace):
        manifest = json.loads((REALDATA / "manifest.json").read_text())
        if args.model not in manifest["models"]:
            sys.exit(f"unknown model {args.model!r}; manifest keys: {', '.join(manifest['models'])}")
        entry = manifest["models"][args.model]
        if not entry.get("dataset"):
            sys.exit(f"{args.model} has no labelled data set in the manifest; pick another model")
        self.entry = entry
        self.model_path = REALDATA / entry["file"]
        self.data_path = REALDATA / manifest["datasets"][entry["dataset"]]["file"]
        self.pre = Preprocess(scale=entry["scale"], mean=entry["mean"], std=entry["std"], layout=entry["layout"])
        self.model = load_model(self.model_path)
        self.io = io_info(self.model)
        self.layers, _ = inventory(self.model, CompressConfig().min_weights)
        x_raw, y_raw = load_npz(self.data_path)
        data = prepare(x_raw, y_raw, self.pre, self.io.input_shape, self.io.input_dtype)
        if args.limit is not None and args.limit < len(data):
            data = data.subset(stratified_subset(data.y, args.limit, SEED))
        self.x, self.y = data.x, data.y
        self.batch = self.io.fixed_batch or BATCH
        self.dense_bytes = without_initializer_inputs(self.model).SerializeToString()

    def config(self, args: argparse.Namespace, estimator: str) -> CompressConfig:
        return CompressConfig(kmin=args.kmin, kmax=args.kmax, filter=args.filter, estimator=estimator,
                              calib=args.calib, limit=args.limit, seed=SEED, batch_size=BATCH)

    def t_pass(self, repeats: int = 3) -> tuple[float, int]:
        """Median time of one full pass of the uncompressed model over the scoring set (a warm session; session
        creation excluded), and its number of correct predictions."""
        sess = ort.InferenceSession(self.dense_bytes, session_options(), providers=["CPUExecutionProvider"])
        inp, outp = self.io.input_name, self.io.output_name
        sess.run([outp], {inp: self.x[:self.batch]})  # warm-up
        times, correct = [], 0
        for _ in range(repeats):
            t0 = time.perf_counter()
            correct = 0
            for i in range(0, len(self.x), self.batch):
                out = sess.run([outp], {inp: self.x[i:i + self.batch]})[0]
                correct += int(np.sum(np.argmax(out.reshape(len(out), -1), axis=1) == self.y[i:i + self.batch]))
            times.append(time.perf_counter() - t0)
        return statistics.median(times), correct


def progress_printer(tag: str):
    def progress(event: str, **kw) -> None:
        if event == "layer" and kw.get("candidates"):
            note(f"  [{tag}] layer {kw.get('index', 0) + 1}/{kw.get('total', '?')} {kw.get('name')}: "
                 f"scoring {kw['candidates']} candidates")
    return progress


# ---------------------------------------------------------------------------------------------------------------
# 1. design-space exploration


def run_axcnn(setup: Setup, args, estimator: str, output: Path, tag: str) -> dict:
    note(f"{tag}: axcnn compress, estimator={estimator}")
    with Window() as w:
        result = compress(setup.model_path, setup.data_path, output, None, setup.config(args, estimator),
                          setup.pre, progress=progress_printer(tag))
    rep = result.report
    t = rep["timing"]
    return {
        "wall_s": w.wall, "cpu_s": w.cpu, "load": w.load,
        "candidates": t["candidates_scored"], "stopped_early": t["candidates_stopped_early"],
        "work_s": t["scoring_s"] + t["estimate_s"], "scoring_s": t["scoring_s"], "estimate_s": t["estimate_s"],
        "clustering_s": t["clustering_s"], "axcnn_cost_t_pass": t["cost_t_pass"], "axcnn_t_pass_s": t["t_pass_s"],
        "reference_correct": round(rep["reference_score"] * rep["samples"]),
        "final_correct": round(rep["final_score"] * rep["samples"]), "loss_pp": rep["accuracy_loss_pp"],
        "compression_ratio": rep["compression_ratio"], "file_ratio": rep["file_ratio"],
        "ks": {layer["name"]: layer["k"] for layer in rep["layers"]},
        "plans": {layer["name"]: layer["scoring_plan"] for layer in rep["layers"]},
    }


def run_baseline(setup: Setup, args, backend: str, tag: str, reference_correct: int) -> dict:
    note(f"{tag}: paper-faithful baseline, {backend} clustering, full-model scoring")
    with Window() as w:
        r = paper_dse(setup.model, setup.layers, setup.x, setup.y, kmin=args.kmin, kmax=args.kmax,
                      fraction=args.filter, backend=backend, input_name=setup.io.input_name,
                      output_name=setup.io.output_name, batch=setup.batch, seed=SEED, progress=note)
    return {
        "wall_s": r.wall_s, "cpu_s": w.cpu, "load": w.load,
        "candidates": r.candidates_scored, "stopped_early": 0, "work_s": r.scoring_s,
        "scoring_s": r.scoring_s, "estimate_s": 0.0, "clustering_s": r.clustering_s, "axcnn_cost_t_pass": None,
        "axcnn_t_pass_s": None, "reference_correct": reference_correct, "final_correct": r.final_correct,
        "loss_pp": (reference_correct - r.final_correct) / r.samples * 100,
        "compression_ratio": r.compression_ratio, "file_ratio": None, "ks": r.ks,
        "scored": {layer.name: layer.scored for layer in r.layers},
    }


def dse(setup: Setup, args, tmp: Path, out: Out, rss: dict) -> dict:
    n = len(setup.y)
    t_pass: dict[str, float] = {}
    ref_correct = 0

    def measure(key: str) -> None:
        nonlocal ref_correct
        t_pass[key], ref_correct = setup.t_pass()
        note(f"T_pass at {key} = {t_pass[key]:.2f}s over {n} samples; reference {ref_correct}/{n}; "
             f"load average {os.getloadavg()[0]:.2f}")

    runs: dict[str, dict] = {}
    measure("b")
    runs["b"] = run_axcnn(setup, args, "inertia", tmp / "b.shared.onnx", "(b)")
    rss["DSE (b) axcnn inertia"] = phase_stats()
    measure("c")
    runs["c"] = run_axcnn(setup, args, "kl", tmp / "c.shared.onnx", "(c)")
    rss["DSE (c) axcnn kl"] = phase_stats()
    measure("a'")
    runs["a'"] = run_baseline(setup, args, "exact", "(a')", ref_correct)
    rss["DSE (a') baseline, exact clustering"] = phase_stats()
    measure("a")
    runs["a"] = run_baseline(setup, args, "sklearn", "(a)", ref_correct)
    rss["DSE (a) baseline, sklearn clustering"] = phase_stats()
    measure("end")
    after = {"b": "c", "c": "a'", "a'": "a", "a": "end"}
    for key, r in runs.items():
        # normalise by the geometric mean of the T_pass measured just before and just after the method
        r["t_pass_before_s"], r["t_pass_after_s"] = t_pass[key], t_pass[after[key]]
        r["t_pass_s"] = math.sqrt(t_pass[key] * t_pass[after[key]])
        r["cost_t_pass"] = r["work_s"] / r["t_pass_s"]

    labels = {
        "a": "(a) paper, sklearn k-means",
        "a'": "(a') paper, exact k-means",
        "b": "(b) axcnn inertia",
        "c": "(c) axcnn kl",
    }
    rows = []
    for key in ("a", "a'", "b", "c"):
        r = runs[key]
        cost_axcnn = "-" if r["axcnn_cost_t_pass"] is None else f"{r['axcnn_cost_t_pass']:.1f}"
        rows.append([labels[key], f"{r['wall_s']:.1f}", f"{r['cpu_s']:.0f}", f"{r['load']:.1f}", str(r["candidates"]),
                     f"{r['work_s']:.1f}", f"{r['t_pass_before_s']:.2f}/{r['t_pass_after_s']:.2f}",
                     f"{r['cost_t_pass']:.1f}", cost_axcnn, f"{r['final_correct'] / n * 100:.2f}",
                     f"{r['loss_pp']:+.2f}", f"{r['compression_ratio']:.2f}"])
    out.table(
        f"DSE: {args.model}, {n} samples, K {args.kmin}..{args.kmax}, filter {args.filter}, "
        f"{len(setup.layers)} layers",
        ["method", "wall s", "CPU s", "load", "cands", "score+est s", "T_pass s", "cost T_pass", "axcnn cost",
         "top1 %", "loss pp", "Eq.1 CR"],
        rows,
        ["(a)/(a'): the paper-faithful baseline of bench/baseline.py (fresh session of the whole model per "
         "candidate, whole scoring set, no early stop) with sklearn / axcnn-exact clustering.",
         "CPU s: CPU seconds of the bench process (all threads) during the method; load: mean 1-minute load "
         "average of the machine during it (2 cores; other processes included).",
         "T_pass s: one full pass of the dense model over the scoring set (warm session, median of 3) measured just "
         "before / just after the method; cost T_pass = (scoring + estimation seconds) / geometric mean of the two.",
         "axcnn cost: the report's timing.cost_t_pass (its own T_pass, measured once at the start of compress: "
         + ", ".join(f"{k} {runs[k]['axcnn_t_pass_s']:.2f} s" for k in ("b", "c")) + ").",
         f"top1 %: final top-1 (reference {ref_correct / n * 100:.2f}%); loss pp = reference - final (negative = "
         "better than the dense model); b/c measured on the written model, a/a' on the final network.",
         "cands: candidates scored (" + ", ".join(f"{k}: {runs[k]['stopped_early']} stopped early"
                                                  for k in ("b", "c")) + ")."],
    )
    ratio_rows = []
    for num, den in (("a", "b"), ("a", "c"), ("a'", "b"), ("a'", "c")):
        rn, rd = runs[num], runs[den]
        ratio_rows.append([f"({num})/({den})", fmt_ratio(rn["wall_s"], rd["wall_s"]),
                           fmt_ratio(rn["cpu_s"], rd["cpu_s"]), fmt_ratio(rn["cost_t_pass"], rd["cost_t_pass"]),
                           fmt_ratio(rn["candidates"], rd["candidates"])])
    out.table("DSE ratios (higher = axcnn cheaper)", ["ratio", "wall time", "CPU time", "cost T_pass", "candidates"],
              ratio_rows)

    names = [spec.name for spec in setup.layers]
    krows = [[name] + [str(runs[key]["ks"].get(name, "-")) for key in ("a", "a'", "b", "c")] + [runs["b"]["plans"]
             .get(name, "-")] for name in names]
    diffs = [f"{name}: a'={runs[ax]['ks'].get(name)} b={runs['b']['ks'].get(name)}"
             for name in names for ax in ("a'",) if runs[ax]["ks"].get(name) != runs["b"]["ks"].get(name)]
    same = not diffs
    same_a = sum(runs["a"]["ks"].get(name) == runs["a'"]["ks"].get(name) for name in names)
    out.table("DSE: chosen K per layer", ["layer", "a", "a'", "b", "c", "b plan"], krows,
              [f"K identical between (a') and (b): {'yes' if same else 'NO'}"
               + ("" if same else " - differences: " + "; ".join(diffs)),
               f"K identical between (a) and (a'): {same_a}/{len(names)} layers (Lloyd's clusters are not the "
               f"optimum, so the inertia ranking and the candidates differ)"])
    return {"t_pass_s": t_pass, "reference_correct": ref_correct,
            "samples": n, "runs": runs, "ks_identical_a_prime_b": same, "k_differences": diffs,
            "shared_model": str(tmp / "b.shared.onnx")}


# ---------------------------------------------------------------------------------------------------------------
# 2. clustering speed


def resnet18_arrays() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(SEED)
    return [(name, (rng.standard_normal(shape) * math.sqrt(2.0 / math.prod(shape[1:]))).astype(np.float32))
            for name, shape in RESNET18]


def warm_up_numba() -> float:
    """Compile every numba kernel of the exact backend on tiny arrays (both the unique and the binned path)."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(1)
    small = rng.standard_normal(500).astype(np.float32)
    for table in (cluster_range(small, 2, 4), cluster_range(small, 2, 4, max_bins=64)):
        for k in table.ks:
            table.get(k)
    return time.perf_counter() - t0


def clustering(args, out: Out) -> dict:
    from sklearn.cluster import KMeans

    arrays = resnet18_arrays()
    total_weights = sum(a.size for _, a in arrays)
    compile_s = warm_up_numba()
    per_layer = []
    t_all = time.perf_counter()
    for name, a in arrays:
        t0 = time.perf_counter()
        table = cluster_range(a, args.kmin, args.kmax)
        inertias = {k: table.inertia(k) for k in table.ks}
        order = sorted(inertias, key=lambda k: (inertias[k], k))
        for k in order[:candidates_to_score(len(order), args.filter)]:
            table.get(k)
        per_layer.append((name, a.size, time.perf_counter() - t0, table.binned))
    exact_s = time.perf_counter() - t_all
    note(f"exact clustering of {len(arrays)} ResNet-18 shapes: {exact_s:.1f}s")

    ks = list(range(args.kmin, args.kmax + 1))
    samples = []
    by_name = dict(arrays)
    for name in SKLEARN_SAMPLE_LAYERS:
        x = by_name[name].astype(np.float64).reshape(-1, 1)
        for k in SKLEARN_SAMPLE_KS:
            t0 = time.perf_counter()
            km = KMeans(n_clusters=k, n_init=1, random_state=SEED).fit(x)
            samples.append((name, x.shape[0], k, time.perf_counter() - t0, int(km.n_iter_)))
            note(f"sklearn KMeans {name} ({x.shape[0]} weights) K={k}: {samples[-1][3]:.2f}s")
    # t = a + b*n + c*n*K (start-up, passes over the data, Lloyd work) fitted by non-negative least squares on the
    # timed pairs: the large layers, which dominate the total, dominate the fit
    from scipy.optimize import nnls  # a dependency of scikit-learn

    design = np.array([[1.0, n, n * k] for _, n, k, _, _ in samples], dtype=np.float64)
    scale = design.max(axis=0)
    coef, _ = nnls(design / scale, np.array([s[3] for s in samples]))
    coef = coef / scale
    predict = lambda n, k: coef[0] + coef[1] * n + coef[2] * n * k  # noqa: E731
    sk_total = sum(predict(a.size, k) for _, a in arrays for k in ks)
    sampled_s = sum(s[3] for s in samples)

    biggest = max(per_layer, key=lambda r: r[2])
    rows = [
        [f"axcnn exact: all K {args.kmin}..{args.kmax} + inertia + get() of best {args.filter:g}", "measured",
         f"{exact_s:.2f}"],
        [f"sklearn KMeans(n_init=1), one fit per K {args.kmin}..{args.kmax}", "EXTRAPOLATED", f"{sk_total:.0f}"],
        ["sklearn / axcnn exact", "", f"{sk_total / exact_s:.0f}x"],
    ]
    out.table(
        f"Clustering: {len(arrays)} ResNet-18 conv/fc weight shapes, {total_weights:,} weights "
        f"(seeded normal values), K {args.kmin}..{args.kmax}",
        ["what", "how", "seconds"], rows,
        [f"numba compile time excluded: the kernels were compiled on a tiny array first ({compile_s:.1f} s, "
         f"or loaded from numba's cache).",
         f"exact: slowest layer {biggest[0]} ({biggest[1]:,} weights) {biggest[2]:.2f} s; "
         f"{sum(r[3] for r in per_layer)} of {len(per_layer)} layers binned to 65536 bins (more unique values).",
         f"sklearn timed on {len(samples)} (layer, K) pairs ({sampled_s:.0f} s in all) and extrapolated to the "
         f"{len(arrays) * len(ks)} pairs with t = {coef[0]:.3g} + {coef[1]:.3g}*n + {coef[2]:.3g}*n*K s "
         "(non-negative least squares):"]
        + [f"  {name} n={n:,} K={k}: {t:.2f} s ({it} Lloyd iterations; model {predict(n, k):.2f} s)"
           for name, n, k, t, it in samples],
    )
    return {"weights": total_weights, "layers": len(arrays), "exact_s": exact_s, "compile_s": compile_s,
            "per_layer": [{"name": n, "weights": w, "seconds": s, "binned": b} for n, w, s, b in per_layer],
            "sklearn_samples": [{"name": a, "weights": n, "k": k, "seconds": t, "iterations": it}
                                for a, n, k, t, it in samples],
            "sklearn_fit": {"a": coef[0], "b_per_weight": coef[1], "c_per_weight_per_k": coef[2]},
            "sklearn_extrapolated_s": sk_total}


# ---------------------------------------------------------------------------------------------------------------
# 3. latency


def latency(setup: Setup, shared_path: Path, out: Out, creations: int = 15, runs: int = 60) -> dict:
    shared_bytes = shared_path.read_bytes()
    expanded_bytes = rewrite.expand(onnx.load_from_string(shared_bytes)).SerializeToString()
    models = {"dense": setup.dense_bytes, "shared": shared_bytes, "expanded": expanded_bytes}
    names = list(models)
    so = session_options()

    def interleaved(fn, rounds: int) -> dict[str, float]:
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            for j in range(len(names)):
                name = names[(r + j) % len(names)]  # rotate the order to spread drift evenly
                t0 = time.perf_counter()
                fn(name)
                times[name].append(time.perf_counter() - t0)
        return {n: statistics.median(v) for n, v in times.items()}

    creation = interleaved(
        lambda n: ort.InferenceSession(models[n], so, providers=["CPUExecutionProvider"]), creations)
    sessions = {n: ort.InferenceSession(b, so, providers=["CPUExecutionProvider"]) for n, b in models.items()}
    inp, outp = setup.io.input_name, setup.io.output_name
    batches = [setup.io.fixed_batch] if setup.io.fixed_batch else [1, 64]
    infer = {}
    for b in batches:
        feed = {inp: np.ascontiguousarray(setup.x[:b])}
        for n in names:
            for _ in range(5):
                sessions[n].run([outp], feed)
        infer[b] = interleaved(lambda n, feed=feed: sessions[n].run([outp], feed), runs if b > 1 else runs * 4)
    feed = {inp: np.ascontiguousarray(setup.x[:batches[-1]])}
    y_shared = sessions["shared"].run([outp], feed)[0]
    diff = float(np.max(np.abs(y_shared - sessions["expanded"].run([outp], feed)[0])))

    rows = [["session creation", f"{creation['dense'] * 1e3:.1f}", f"{creation['shared'] * 1e3:.1f}",
             f"{creation['expanded'] * 1e3:.1f}", fmt_ratio(creation["shared"], creation["dense"]),
             fmt_ratio(creation["shared"], creation["expanded"])]]
    for b, t in infer.items():
        rows.append([f"inference, batch {b}", f"{t['dense'] * 1e3:.2f}", f"{t['shared'] * 1e3:.2f}",
                     f"{t['expanded'] * 1e3:.2f}", fmt_ratio(t["shared"], t["dense"]),
                     fmt_ratio(t["shared"], t["expanded"])])
    sizes = {n: len(b) for n, b in models.items()}
    out.table(
        "Latency: onnxruntime CPU, shared model (b) vs dense original vs expand()ed shared model",
        ["what (median ms)", "dense", "shared", "expanded", "shared/dense", "shared/expanded"], rows,
        [f"medians of {creations} session creations and of {runs} runs (batch 1: {runs * 4}) per model, the three "
         f"models interleaved; default session options (all graph optimisations).",
         f"file bytes: dense {sizes['dense']:,}, shared {sizes['shared']:,}, expanded {sizes['expanded']:,}; "
         f"max |shared - expanded| output difference: {diff:g}."],
    )
    return {"creation_s": creation, "inference_s": {str(b): t for b, t in infer.items()}, "bytes": sizes,
            "max_abs_diff_shared_expanded": diff}


# ---------------------------------------------------------------------------------------------------------------


def write_docs(text: str, command: str, begin: str = BEGIN, end: str = END) -> None:
    doc = DOCS.read_text()
    if begin not in doc or end not in doc:
        sys.exit(f"{DOCS} has no {begin} ... {end} section to rewrite")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    body = f"\nRun of {stamp}, command `{command}`:\n\n```text\n{text.strip()}\n```\n"
    DOCS.write_text(head + begin + body + end + tail)
    note(f"rewrote the {begin} section of {DOCS}")


# ---------------------------------------------------------------------------------------------------------------
# 4. budget mode


def budget(setup: Setup, args, tmp: Path, out: Out) -> dict:
    """--max-loss on the scoring set, its cost in T_pass of that whole set, beside the K-range command (b)."""
    n = len(setup.y)
    t_before, _ = setup.t_pass()
    rows: dict[str, dict] = {}
    for pp in args.budget_losses:
        note(f"budget: axcnn compress --max-loss {pp:g}")
        with Window() as w:
            rep = compress(setup.model_path, setup.data_path, tmp / f"budget{pp:g}.onnx", None,
                           CompressConfig(max_loss=pp, seed=SEED, limit=args.limit, batch_size=BATCH),
                           setup.pre).report
        rows[f"--max-loss {pp:g}"] = {"wall_s": w.wall, "cpu_s": w.cpu, "load": w.load, "search_s": rep["search_s"],
                                      "total_s": rep["timing"]["total_s"], "cr": rep["compression_ratio"],
                                      "file_ratio": rep["file_ratio"], "evaluation": rep["evaluation"],
                                      "times": rep["search_times_s"], "counts": rep["search_counts"],
                                      "ks": [layer["k"] for layer in rep["layers"]]}
    note("budget: axcnn compress with the K range (b), for comparison")
    with Window() as w:
        rep = compress(setup.model_path, setup.data_path, tmp / "range.onnx", None, setup.config(args, "inertia"),
                       setup.pre).report
    rows["K range (b)"] = {"wall_s": w.wall, "cpu_s": w.cpu, "load": w.load, "search_s": rep["timing"]["scoring_s"]
                           + rep["timing"]["estimate_s"] + rep["timing"]["clustering_s"],
                           "total_s": rep["timing"]["total_s"], "cr": rep["compression_ratio"],
                           "file_ratio": rep["file_ratio"], "evaluation": rep["evaluation"], "times": {},
                           "counts": {}, "ks": [layer["k"] for layer in rep["layers"]]}
    t_after, _ = setup.t_pass()
    t_pass = math.sqrt(t_before * t_after)
    table = []
    for name, r in rows.items():
        r["cost_t_pass"] = r["search_s"] / t_pass
        ev = r["evaluation"]
        ver = ev.get("verification") or {}
        table.append([name, f"{r['cost_t_pass']:.1f}", f"{r['search_s']:.0f}", f"{r['wall_s']:.0f}",
                      f"{r['cr']:.2f}", f"{r['file_ratio']:.2f}", f"{ev['selection']['accuracy_loss_pp']:.2f}",
                      f"{ver.get('accuracy_loss_pp', float('nan')):.2f}", f"{r['load']:.1f}"])
    out.table(f"Budget mode on {n} samples: search cost in T_pass (one pass of the dense model over all {n}; "
              f"{t_pass:.2f}s here)",
              ["run", "search T_pass", "search s", "wall s", "Eq.1 CR", "file CR", "sel. loss pp", "ver. loss pp",
               "load"], table,
              ["search s = the budget search (sensitivity table, assemblies, measurements, verification) as the "
               "report's search_s; for the K range, clustering + estimates + scoring. wall s = the whole compress "
               "call (loading, final check of the written file, report). The budget runs hold out 30% of the samples "
               "(selection 70%, verification 30%); the K-range run scores on all of them."])
    for name, r in rows.items():
        if r["times"]:
            out(f"{name}: " + ", ".join(f"{k} {v:.0f}s" for k, v in r["times"].items()) + "; "
                + ", ".join(f"{k} {v}" for k, v in r["counts"].items()) + f"; K {r['ks']}")
    return {"t_pass_s": t_pass, "runs": rows}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cifar10_resnet20", help="model key of ../shared/realdata/manifest.json")
    p.add_argument("--limit", type=int, default=None, help="score on a stratified subset (default: full test set)")
    p.add_argument("--kmin", type=int, default=40)
    p.add_argument("--kmax", type=int, default=80)
    p.add_argument("--filter", type=float, default=0.15, help="fraction of candidates fully scored per layer")
    p.add_argument("--calib", type=int, default=256, help="calibration samples of the kl estimator")
    p.add_argument("--only", choices=("all", "clustering", "latency", "dse", "budget"), default="all")
    p.add_argument("--budget-losses", type=float, nargs="+", default=[1.0], metavar="PP",
                   help="--max-loss values of the budget section")
    p.add_argument("--write-docs", action="store_true", help="rewrite the figures section of docs/benchmarks.md")
    p.add_argument("--json", metavar="OUT", help="dump all figures as JSON")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    command = "python bench/run.py" + "".join(" " + shlex.quote(a) for a in (argv or sys.argv[1:]))
    out = Out()
    mach = machine()
    started = datetime.datetime.now().astimezone()
    out(f"axcnn benchmark, {started:%Y-%m-%d %H:%M %Z}: {command}")
    out(f"machine: {mach['cpu']}, {mach['cores']} cores ({mach['usable_cores']} usable), {mach['ram_gb']} GB RAM; "
        f"Python {mach['python']}, numpy {mach['numpy']}, onnxruntime {mach['onnxruntime']} (CPU), "
        f"onnx {mach['onnx']}, numba {mach['numba']}, scikit-learn {mach['sklearn']}; "
        f"load average at start {mach['loadavg_start'][0]:.2f}")
    figures: dict = {"command": command, "date": started.isoformat(), "machine": mach,
                     "settings": {k: v for k, v in vars(args).items() if k not in ("write_docs", "json")}}
    rss: dict[str, tuple[float, float]] = {"start (imports)": phase_stats()}
    with tempfile.TemporaryDirectory(prefix="axcnn-bench-") as tmpdir:
        tmp = Path(tmpdir)
        setup = None
        if args.only in ("all", "dse", "latency", "budget"):
            setup = Setup(args)
            rss["setup (model + scoring set)"] = phase_stats()
            out(f"model: {args.model} ({setup.model_path.name}), {len(setup.layers)} shareable layers; scoring set "
                f"{len(setup.y)} samples of {setup.data_path.name}")
        if args.only in ("all", "dse"):
            figures["dse"] = dse(setup, args, tmp, out, rss)
        if args.only in ("all", "clustering"):
            figures["clustering"] = clustering(args, out)
            rss["clustering (ResNet-18 shapes)"] = phase_stats()
        if args.only in ("all", "budget"):
            budget_out = Out()
            figures["budget"] = budget(setup, args, tmp, budget_out)
            out.lines += budget_out.lines
        if args.only in ("all", "latency"):
            shared = tmp / "b.shared.onnx"
            if not shared.exists():
                note("latency: compressing the model first, as in DSE (b)")
                run_axcnn(setup, args, "inertia", shared, "(b)")
                rss["compress (b) for latency"] = phase_stats()
            figures["latency"] = latency(setup, shared, out)
            rss["latency"] = phase_stats()
    out.table("Peak RSS of the bench process (resource.getrusage ru_maxrss) after each phase",
              ["after phase", "peak RSS MB", "load avg"], [[k, f"{m:.0f}", f"{la:.2f}"] for k, (m, la) in rss.items()],
              ["ru_maxrss is the peak so far: a phase that does not raise it shows the previous peak. load avg = "
               "1-minute load average of the machine (2 cores) when the phase ended; other processes included."])
    figures["peak_rss_mb"] = {k: m for k, (m, _) in rss.items()}
    figures["loadavg_after_phase"] = {k: la for k, (_, la) in rss.items()}
    mach["loadavg_end"] = os.getloadavg()
    out("")
    out(f"load average at the end {mach['loadavg_end'][0]:.2f}; "
        f"total {(datetime.datetime.now().astimezone() - started).total_seconds() / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str) + "\n")
        note(f"wrote {args.json}")
    if args.write_docs and args.only == "budget":
        write_docs("\n".join(budget_out.lines), command, BUDGET_BEGIN, BUDGET_END)
    elif args.write_docs:
        write_docs("\n".join(out.lines), command)


if __name__ == "__main__":
    main()
