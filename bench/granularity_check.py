#!/usr/bin/env python
"""Granularity and vector sharing on the real models in ../shared/realdata: the done-when runs of issue 11 and the
trade-off table of docs/granularity.md.

Every run is the CLI exactly as a user types it (``python -m axcnn.cli compress MODEL --data X.npz --scale ..
--granularity .. -o OUT --report OUT.json``); the written file is then checked independently of the report, as
bench/realdata_check.py does: onnx.checker (full_check), an onnxruntime session of its own, top-1 on the FULL test
set with its own preprocessing (per the manifest) against its own measurement of the original model, and file sizes
on disk. Besides the whole file's ratio, the ratio over the shared tensors alone (dense bytes of the clustered
weights / bytes of their index and centroid tensors, from the report) is set against the Eq. 1 ratio, since a
model's unshared tensors (biases, small layers) and the graph weigh on the whole file's ratio.

    PYTHONPATH=. python bench/granularity_check.py --runs done --json /tmp/gran_done.json
    PYTHONPATH=. python bench/granularity_check.py --runs tradeoff --json /tmp/gran_tradeoff.json

Exit status 1 when a done-when check fails.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realdata_check import (  # noqa: E402
    DEFAULT_REALDATA,
    Bench,
    _first_line,
    compress_command,
    files_bytes,
    git_state,
    preprocess,
    run_compress,
    session,
)

BASKOV, RESNET = "mnist_cnn_baskov", "cifar10_resnet20"
LIMIT = ["--limit", "1000"]

#: (model, tag, flags, checks): the done-when runs of issue 11
DONE = [
    (BASKOV, "channel4", ["--granularity", "channel", "--group-size", "4", "--kmin", "4", "--kmax", "8",
                          "--filter", "0.5", *LIMIT], {"max_loss_pp": 2.0}),
    (BASKOV, "kernel", ["--granularity", "kernel", "--kmin", "4", "--kmax", "8", "--filter", "0.5", *LIMIT],
     {"max_loss_pp": 2.0}),
    (RESNET, "vector2", ["--vector-dim", "2", "--kmin", "64", "--kmax", "256", "--filter", "0.05", *LIMIT],
     {"file_over_cr": 0.9}),
]


def _tradeoff() -> list[tuple[str, str, list[str], dict]]:
    runs = []
    for model in (RESNET, BASKOV):
        for k in (("4", "8"), ("16", "16")):
            kr = ["--kmin", k[0], "--kmax", k[1], "--filter", "0.5", *LIMIT]
            runs.append((model, f"layer.k{k[0]}-{k[1]}", kr, {}))
            for g in ("1", "4", "16"):
                runs.append((model, f"channel{g}.k{k[0]}-{k[1]}", ["--granularity", "channel", "--group-size", g,
                                                                     *kr], {}))
        runs.append((model, "kernel.k2-4", ["--granularity", "kernel", "--kmin", "2", "--kmax", "4", "--filter",
                                            "0.5", *LIMIT], {}))
        for k in ("64", "256"):  # one K: 6 or 8 bits a pair, 3 or 4 a weight (a range of K is slow to fit)
            runs.append((model, f"vector2.k{k}", ["--vector-dim", "2", "--kmin", k, "--kmax", k, *LIMIT], {}))
    # 5-bit points on ResNet-20, to set layer and channel granularity side by side at about the same ratio
    for tag, extra in (("layer", []), ("channel4", ["--granularity", "channel", "--group-size", "4"])):
        runs.append((RESNET, f"{tag}.k32-32", [*extra, "--kmin", "32", "--kmax", "32", *LIMIT], {}))
    return runs


def cr_all(model: Path, rep: dict) -> float:
    """Eq. 1 ratio over every shareable weight of the model: a layer the run left dense (no K made it smaller)
    counts with its dense bits, so that runs that shared different layers compare fairly. (The report's ratio is
    over the layers it shared.)"""
    from axcnn.model import inventory, load_model

    layers, _ = inventory(load_model(model), rep["settings"]["min_weights"])
    shared = {layer["name"]: layer["eq1_bits"] for layer in rep["layers"]}
    dense = sum(s.weights * s.bits for s in layers)
    return dense / sum(shared.get(s.name, s.weights * s.bits) for s in layers)


def correct_mask(path: Path, x: np.ndarray, y: np.ndarray, batch: int = 500) -> np.ndarray:
    """Which samples the model's first output gets right (top-1)."""
    sess = session(path)
    name = sess.get_inputs()[0].name
    out = np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])
    return out.reshape(len(out), -1).argmax(1) == y


def paired_loss(bench: Bench, name: str, path: Path, cache: dict = {}) -> dict:  # noqa: B006 (a cache)
    """Top-1 loss of ``path`` against the original model on the full test set, with the 95% interval of the paired
    difference (normal approximation) and the samples lost and gained."""
    entry = bench.manifest["models"][name]
    x_raw, y = bench.data(entry["dataset"])
    if name not in cache:
        x = preprocess(x_raw, entry)
        cache[name] = (x, correct_mask(bench.realdata / entry["file"], x, y))
    x, ref = cache[name]
    got = correct_mask(path, x, y)
    n, lost, gained = len(y), int(np.sum(ref & ~got)), int(np.sum(~ref & got))
    half = 1.96 * np.sqrt(lost + gained - (lost - gained) ** 2 / n) / n
    return {"original_top1": float(ref.mean()), "shared_top1": float(got.mean()), "eval_samples": n,
            "loss_pp": 100 * (lost - gained) / n, "ci95_half_pp": 100 * half, "lost": lost, "gained": gained}


def run(bench: Bench, name: str, tag: str, flags: list[str], checks: dict, rescore: bool = False) -> dict:
    """Compress (unless ``rescore``: measure the output a former run left in the work folder) and measure."""
    entry = bench.manifest["models"][name]
    model = bench.realdata / entry["file"]
    data = bench.realdata / bench.manifest["datasets"][entry["dataset"]]["file"]
    out = bench.workdir / f"{name}.{tag}.onnx"
    rep_path = bench.workdir / f"{name}.{tag}.json"
    row: dict = {"model": name, "run": tag, "flags": " ".join(flags), "checks": {}, "errors": []}
    if rescore:
        if not rep_path.is_file():
            return {**row, "errors": [f"no report {rep_path} to rescore"], "checks": {"compress": False}}
        return measure(bench, name, out, rep_path, checks, row)
    cmd, env = compress_command(model, data, entry, flags, out, rep_path)
    print(f"[{dt.datetime.now():%H:%M:%S}] {name} ({tag}): compress {' '.join(flags)}", flush=True)
    if not run_compress(cmd, env, bench.workdir, row):
        return row
    return measure(bench, name, out, rep_path, checks, row)


def measure(bench: Bench, name: str, out: Path, rep_path: Path, checks: dict, row: dict) -> dict:
    """The checks of one written model, independent of axcnn but for the report's per-layer figures."""
    model = bench.realdata / bench.manifest["models"][name]["file"]
    rep = json.loads(rep_path.read_text())
    layers = rep["layers"]
    dense_bytes = sum(layer["weights"] * layer["bits"] // 8 for layer in layers)
    stored = sum(layer["stored_bytes"] for layer in layers)
    used: dict[str, int] = {}
    for layer in layers:
        g = layer.get("granularity", "layer")
        key = f"vector{layer['vector_dim']}" if layer.get("vector_dim", 1) > 1 else (
            f"channel/{layer['group_size']}" if g == "channel" else g)
        used[key] = used.get(key, 0) + 1
    row.update(
        compression_ratio=rep["compression_ratio"], layers=len(layers), skipped=[s["name"] for s in rep["skipped"]
                                                                                 if s.get("reason") != "bias"],
        k=sorted({layer["k"] for layer in layers}), sharing_used=used,
        notes=sorted({layer["granularity_note"] for layer in layers if layer.get("granularity_note")}),
        report_selection_loss_pp=rep["accuracy_loss_pp"], report_samples=rep["samples"],
        shared_dense_bytes=dense_bytes, shared_stored_bytes=stored, shared_file_ratio=dense_bytes / stored,
        report_total_s=rep["timing"]["total_s"], cr_all=cr_all(model, rep),
    )
    try:
        onnx.checker.check_model(str(out), full_check=True)
        row["checks"]["checker"] = True
    except Exception as exc:  # any checker failure is a finding
        row["checks"]["checker"] = False
        row["errors"].append(f"checker: {_first_line(str(exc))}")
    try:
        row.update(paired_loss(bench, name, out))
        row["checks"]["runs"] = True
    except Exception as exc:
        row["checks"]["runs"] = False
        row["errors"].append(f"onnxruntime: {_first_line(str(exc))}")
        return row
    row.update(bytes_before=files_bytes(model), bytes_after=files_bytes(out))
    row["file_ratio"] = row["bytes_before"] / row["bytes_after"]
    row["file_over_cr"] = row["file_ratio"] / rep["compression_ratio"]
    row["shared_over_cr"] = row["shared_file_ratio"] / rep["compression_ratio"]
    if "max_loss_pp" in checks:
        row["checks"][f"loss<={checks['max_loss_pp']:g}pp"] = row["loss_pp"] <= checks["max_loss_pp"]
    if "file_over_cr" in checks:
        row["checks"][f"file>={checks['file_over_cr']:g}CR"] = row["file_over_cr"] >= checks["file_over_cr"]
    return row


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table(rows: list[dict]) -> str:
    headers = ["model", "run", "sharing used", "K", "CR (Eq.1)", "CR all", "orig", "shared", "loss pp", "95% ±",
               "file x", "file/CR", "shared-tensor x", "shared/CR", "time s", "result"]
    lines = []
    for r in rows:
        k = r.get("k")
        failed = [c for c, ok in r["checks"].items() if not ok]
        lines.append([
            r["model"], r["run"], ",".join(f"{n} {g}" for g, n in (r.get("sharing_used") or {}).items()) or "-",
            "-" if not k else f"{k[0]}-{k[-1]}" if len(k) > 1 else str(k[0]), _f(r.get("compression_ratio"), ".2f"),
            _f(r.get("cr_all"), ".2f"),
            _f(r.get("original_top1"), ".4f"), _f(r.get("shared_top1"), ".4f"), _f(r.get("loss_pp"), "+.2f"),
            _f(r.get("ci95_half_pp"), ".2f"),
            _f(r.get("file_ratio"), ".2f"), _f(r.get("file_over_cr"), ".2f"), _f(r.get("shared_file_ratio"), ".2f"),
            _f(r.get("shared_over_cr"), ".2f"), _f(r.get("compress_wall_s") or r.get("report_total_s"), ".0f"),
            "PASS" if not failed else "FAIL: " + ",".join(failed),
        ])
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) if i < 3 or i == len(x) - 1 else c.rjust(w)
                      for i, (c, w) in enumerate(zip(x, widths, strict=True))) for x in lines]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--realdata", type=Path, default=DEFAULT_REALDATA, help="folder with manifest.json")
    ap.add_argument("--workdir", type=Path, help="keep the written models and reports here (default: a temp dir)")
    ap.add_argument("--runs", choices=("done", "tradeoff", "all"), default="done")
    ap.add_argument("--only", help="comma-separated run tags (model.tag or tag) to run of the chosen set")
    ap.add_argument("--json", type=Path, help="write all measurements here")
    ap.add_argument("--rescore", action="store_true", help="do not compress: measure the outputs a former run left "
                    "in --workdir")
    args = ap.parse_args(argv)
    if args.rescore and not args.workdir:
        ap.error("--rescore needs the --workdir of a former run")
    if not (args.realdata / "manifest.json").is_file():
        print(f"{args.realdata}/manifest.json not found; nothing to check", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="axcnn-granularity-"))
    workdir.mkdir(parents=True, exist_ok=True)
    bench = Bench(args.realdata, workdir.resolve())
    runs = (DONE if args.runs in ("done", "all") else []) + (_tradeoff() if args.runs in ("tradeoff", "all") else [])
    if args.only:
        wanted = set(args.only.split(","))
        runs = [r for r in runs if r[1] in wanted or f"{r[0]}.{r[1]}" in wanted]
    started = dt.datetime.now().astimezone()
    print(f"axcnn at {git_state()}, {started:%Y-%m-%d %H:%M %Z}", flush=True)
    t0 = time.perf_counter()
    rows = []
    for name, tag, flags, checks in runs:
        rows.append(run(bench, name, tag, flags, checks, args.rescore))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    for r in rows:
        for e in r["errors"] + [f"note: {n}" for n in r.get("notes", [])]:
            print(f"  {r['model']} ({r['run']}): {e}")
    failed = [(r["model"], r["run"], c) for r in rows for c, ok in r["checks"].items() if not ok]
    total_s = time.perf_counter() - t0
    print(f"\n{len(rows)} runs, {len(failed)} failed checks, {total_s / 60:.1f} min")
    if args.json:
        args.json.write_text(json.dumps({
            "date": started.isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "commit": git_state(), "total_s": total_s, "rows": rows, "failed": failed}, indent=2, default=str))
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
