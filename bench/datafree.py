#!/usr/bin/env python
"""Data-free vs real data: do synthetic inputs choose K as well as the test set does?

For each model of ../shared/realdata (a labelled one, with the manifest's preprocessing) and each setting, runs
``axcnn.api.compress`` (the same call as the CLI) several ways with the same K range and filter:

- ``real``: on the labelled test set (``--data X.npz`` plus the manifest's flags, ``--limit`` samples, top-1);
- ``free-<generator>``: data-free (no data), the manifest's preprocessing flags given, so the synthetic images go
  through the same conversion as real pixels; one run per generator of ``axcnn.data.synthetic``;
- ``free-plain``: data-free with no flags at all (the bare command ``axcnn compress model.onnx``), default
  generator: the inputs are then about zero-mean, unit-variance whatever the model expects;
- ``kmin``/``kmax`` (the ``hard`` setting only): every layer at the smallest or the largest K of the range, the
  uninformed choices any scoring should beat (one candidate per layer: the data plays no part).

Then measures every written model independently of axcnn (own onnxruntime session, the manifest's preprocessing
written out in numpy): top-1 on the FULL test set, the loss in points against the original model, the agreement
of its top-1 with the original's, and compares each run's chosen K per layer with the real-data run's.

Settings: ``default`` = --kmin 40 --kmax 80 --filter 0.15 (the design card's command); ``hard`` = --kmin 4
--kmax 16 --filter 1.0 (every K scored, so the choice rests entirely on the scoring data).

    PYTHONPATH=. python bench/datafree.py --json /tmp/datafree.json            # about 40-60 min on 2 busy cores
    PYTHONPATH=. python bench/datafree.py --models mnist_cnn_baskov --settings hard
    PYTHONPATH=. python bench/datafree.py --models cifar10_resnet8_tiny --settings hard --runs free-mix kmax

Writes nothing into the repository; compressed models go to a temporary folder removed at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from axcnn.api import compress  # noqa: E402
from axcnn.config import CompressConfig  # noqa: E402
from axcnn.data import Preprocess, synthetic  # noqa: E402

DEFAULT_REALDATA = REPO.parent / "shared" / "realdata"
MODELS = ("cifar10_resnet20", "cifar10_resnet8_tiny", "cifar10_squeezenet_nhwc", "mnist_cnn_baskov",
          "fashion_cnn_edwin19")
SETTINGS = {"default": {"kmin": 40, "kmax": 80, "filter": 0.15}, "hard": {"kmin": 4, "kmax": 16, "filter": 1.0}}


def preprocess(x: np.ndarray, entry: dict) -> np.ndarray:
    """The manifest's recipe, independent of axcnn.data: (x / scale - mean) / std per channel, then the layout."""
    x = x.astype(np.float32)
    if x.ndim == 3:
        x = x[..., None]
    x = (x / np.float32(entry["scale"]) - np.asarray(entry["mean"], np.float32)) / np.asarray(entry["std"],
                                                                                                np.float32)
    if entry["layout"] == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=np.float32)


def predictions(path: Path, x: np.ndarray, batch: int = 500) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    bs = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else batch
    out = [sess.run(None, {inp.name: x[i:i + bs]})[0] for i in range(0, len(x), bs)]
    return np.concatenate(out).reshape(len(x), -1).argmax(axis=1)


def runs_for(setting: str, generators: list[str]) -> list[str]:
    names = ["real"] + [f"free-{g}" for g in generators] + ["free-plain"]
    return names + (["kmin", "kmax"] if setting == "hard" else [])


def one_run(name: str, model_path: Path, npz: Path, entry: dict, setting: dict, limit: int, out: Path) -> dict:
    flags = Preprocess(scale=entry["scale"], mean=tuple(entry["mean"]), std=tuple(entry["std"]),
                       layout=entry["layout"])
    cfg = dict(setting)
    data, pre = None, flags
    if name == "real":
        data, cfg["limit"] = npz, limit
    elif name.startswith("free-"):
        gen = name.removeprefix("free-")
        if gen == "plain":
            gen, pre = synthetic.DEFAULT_GENERATOR, Preprocess()
        synthetic_default = synthetic.DEFAULT_GENERATOR
        synthetic.DEFAULT_GENERATOR = gen  # what load() draws with when no generator is given
    else:  # kmin / kmax: one candidate per layer
        k = setting[name]
        cfg.update(kmin=k, kmax=k)
    t0 = time.perf_counter()
    try:
        rep = compress(model_path, data, out, None, CompressConfig(**cfg), pre).report
    finally:
        if name.startswith("free-"):
            synthetic.DEFAULT_GENERATOR = synthetic_default
    return {"wall_s": time.perf_counter() - t0, "ks": {layer["name"]: layer["k"] for layer in rep["layers"]},
            "cr": rep["compression_ratio"], "search_reference": rep["reference_score"],
            "search_final": rep["final_score"], "metric": rep["metric"], "data": rep.get("data")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--realdata", type=Path, default=DEFAULT_REALDATA)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--generators", nargs="+", default=list(synthetic.GENERATORS), choices=synthetic.GENERATORS)
    ap.add_argument("--runs", nargs="+", help="only these runs (e.g. free-mix kmax); K is compared with real's only "
                    "when 'real' is among them")
    ap.add_argument("--limit", type=int, default=1000, help="samples of the real-data run (synthetic: 1000)")
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args()
    manifest = json.loads((args.realdata / "manifest.json").read_text())
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="axcnn-datafree-") as tmp:
        for key in args.models:
            entry = manifest["models"][key]
            ds = manifest["datasets"][entry["dataset"]]
            model_path, npz = args.realdata / entry["file"], args.realdata / ds["file"]
            z = np.load(npz)
            x, y = preprocess(z["x"], entry), z["y"]
            orig = predictions(model_path, x)
            orig_top1 = float(np.mean(orig == y))
            for sname in args.settings:
                rows = {}
                for name in runs_for(sname, args.generators):
                    if args.runs and name not in args.runs:
                        continue
                    out = Path(tmp) / f"{key}-{sname}-{name}.onnx"
                    r = one_run(name, model_path, npz, entry, SETTINGS[sname], args.limit, out)
                    pred = predictions(out, x)
                    r.update(top1=float(np.mean(pred == y)), agreement=float(np.mean(pred == orig)))
                    r["loss_pp"] = 100 * (orig_top1 - r["top1"])
                    rows[name] = r
                    print(f"{key:26s} {sname:7s} {name:14s} loss {r['loss_pp']:+6.2f} pp  agree "
                          f"{100 * r['agreement']:6.2f}%  CR {r['cr']:5.2f}  search {r['metric']} "
                          f"{100 * r['search_final']:6.2f}%  {r['wall_s']:6.1f}s", flush=True)
                real = rows["real"]["ks"] if "real" in rows else {}
                for r in rows.values() if real else ():
                    diff = [abs(r["ks"][n] - k) for n, k in real.items()]
                    r["k_same"] = int(sum(d == 0 for d in diff))
                    r["k_layers"] = len(diff)
                    r["k_mean_abs_diff"] = float(np.mean(diff))
                results.setdefault(key, {"original_top1": orig_top1})[sname] = rows
                if args.json:
                    args.json.write_text(json.dumps(results, indent=2))
    print()
    print(table(results))
    return 0


def table(results: dict) -> str:
    lines = ["| model | setting | run | loss pp (full set) | agreement | CR | K = real's | mean abs K diff |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for key, per in results.items():
        for sname, rows in per.items():
            if sname == "original_top1":
                continue
            for name, r in rows.items():
                same = f"{r['k_same']}/{r['k_layers']} | {r['k_mean_abs_diff']:.2f}" if "k_same" in r else "- | -"
                lines.append(f"| {key} | {sname} | {name} | {r['loss_pp']:+.2f} | {100 * r['agreement']:.2f}% "
                             f"| {r['cr']:.2f} | {same} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
