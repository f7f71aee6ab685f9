#!/usr/bin/env python
"""Budget mode, checked on samples it never saw (issue 8's acceptance).

For each model and budget: a seeded, label-stratified half of the model's test set is written to an npz and given
to the CLI exactly as a user would::

    axcnn compress MODEL --data HALF.npz --scale S --mean .. --std .. --layout L --max-loss PP -o OUT.onnx

The other half is never shown to axcnn. This script then measures, with its own preprocessing (per the manifest) and
its own onnxruntime sessions, the top-1 of the original and of the written model on that other half, and reports the
loss beside the report's own figures (selection and verification parts, Eq. 1 ratio, file ratio) and the run's time.

    PYTHONPATH=. python bench/budget_check.py --models cifar10_resnet20 --budgets 0.5 1.0 --json /tmp/budget.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata"
sys.path.insert(0, str(REPO / "bench"))

from realdata_check import compress_command, preprocess  # noqa: E402


def half_split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A label-stratified random half (given to axcnn) and the rest (never shown)."""
    rng = np.random.default_rng(seed)
    given = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        given.append(rng.choice(idx, size=len(idx) // 2, replace=False))
    given = np.sort(np.concatenate(given))
    rest = np.setdiff1d(np.arange(len(y)), given)
    return given, rest


def top1(path: Path, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    fixed = sess.get_inputs()[0].shape[0]
    bs = fixed if isinstance(fixed, int) and fixed > 0 else 500
    out = []
    for i in range(0, len(x), bs):
        chunk = x[i:i + bs]
        n = len(chunk)
        if n < bs and isinstance(fixed, int) and fixed > 0:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - n, axis=0)])
        out.append(sess.run(None, {name: chunk})[0][:n].reshape(n, -1).argmax(1))
    return np.concatenate(out) == y


def run(model: str, budget: float, mode: str, seed: int, extra: list[str], work: Path) -> dict:
    manifest = json.loads((REALDATA / "manifest.json").read_text())
    entry = manifest["models"][model]
    data = np.load(REALDATA / manifest["datasets"][entry["dataset"]]["file"])
    x, y = data["x"], data["y"].astype(np.int64)
    given, rest = half_split(y, seed)
    half = work / f"{model}.half.npz"
    np.savez(half, x=x[given], y=y[given])
    out = work / f"{model}.{mode}{budget:g}.onnx"
    rep = work / f"{model}.{mode}{budget:g}.report.json"
    flag = "--max-loss" if mode == "loss" else "--target-cr"
    cmd, env = compress_command(REALDATA / entry["file"], half, entry, [flag, str(budget), *extra], out, rep)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    row = {"model": model, "mode": mode, "budget": budget, "extra": extra, "exit": proc.returncode, "wall_s": wall}
    if proc.returncode != 0:
        row["error"] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"
        return row
    r = json.loads(rep.read_text())
    xr = preprocess(x[rest], entry)
    dense = top1(REALDATA / entry["file"], xr, y[rest])
    shared = top1(out, xr, y[rest])
    row.update(
        unseen_samples=len(rest), unseen_reference=float(dense.mean()), unseen_final=float(shared.mean()),
        unseen_loss_pp=100 * float(dense.mean() - shared.mean()),
        report_cr=r["compression_ratio"], file_ratio=r["file_ratio"],
        selection=r["evaluation"]["selection"], verification=r["evaluation"]["verification"],
        ks=[layer["k"] for layer in r["layers"]], cost_t_pass=r["timing"]["cost_t_pass"],
        measured_points=len(r["budget"]["measured_points"]), verification_checks=r["budget"]["verification_checks"],
    )
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["cifar10_resnet20"])
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.5, 1.0])
    ap.add_argument("--target-cr", nargs="*", type=float, default=[])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra", default="", help="more compress flags, space separated")
    ap.add_argument("--json")
    ap.add_argument("--keep", help="write the models and reports into this folder (kept) instead of a temporary one")
    args = ap.parse_args()
    rows = []
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="axcnn-budget-") as scratch:
        tmp = args.keep or scratch
        for model in args.models:
            for mode, values in (("loss", args.budgets), ("cr", args.target_cr)):
                for b in values:
                    row = run(model, b, mode, args.seed, args.extra.split(), Path(tmp))
                    rows.append(row)
                    if row["exit"] != 0:
                        print(f"{model} {mode} {b:g}: exit {row['exit']}: {row.get('error')}", flush=True)
                        continue
                    ver = row["verification"] or {}
                    print(f"{model} {mode} {b:g}: CR {row['report_cr']:.2f} (file {row['file_ratio']:.2f})  "
                          f"unseen loss {row['unseen_loss_pp']:.2f} pp  selection "
                          f"{row['selection']['accuracy_loss_pp']:.2f}  verification "
                          f"{ver.get('accuracy_loss_pp', float('nan')):.2f}  cost {row['cost_t_pass']:.1f} T_pass  "
                          f"wall {row['wall_s']:.0f}s  K {row['ks']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
