#!/usr/bin/env python
"""Acceptance run of axcnn on the real models and test sets in ../shared/realdata.

For every model with a labelled test set, runs the CLI exactly as a user would::

    python -m axcnn.cli compress MODEL --data X.npz --scale S --mean .. --std .. --layout L \\
        --kmin 40 --kmax 80 --filter 0.15 --limit 1000 -o OUT.onnx --report OUT.json

and then checks the written file independently of the report: onnx.checker (full_check), an onnxruntime session of
its own, top-1 on the FULL test set with its own preprocessing of the npz (per the manifest), against the manifest's
reference_top1 and against its own measurement of the original model; file sizes measured on disk (model file plus
external data). Two extra runs with ``--kmin 4 --kmax 16`` (cifar10_resnet56, fashion_cnn_edwin19) check that the
file shrinks as Eq. 1 says: original bytes / compressed bytes >= 0.9 x the reported compression ratio. On every run,
every shared layer must store at most 1.02 x Eq.1 bits / 8 + 16 bytes.

Prints a table; ``--json OUT`` also writes every measurement. Exit status 1 when a target fails.

    PYTHONPATH=. python bench/realdata_check.py --json /tmp/realdata.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REALDATA = REPO.parent / "shared" / "realdata"

MAIN_FLAGS = ["--kmin", "40", "--kmax", "80", "--filter", "0.15", "--limit", "1000"]
FILESIZE_FLAGS = ["--kmin", "4", "--kmax", "16", "--filter", "0.15", "--limit", "1000"]
FILESIZE_MODELS = ("cifar10_resnet56", "fashion_cnn_edwin19")
MAX_LOSS_PP = 1.0
RESNET20_MIN_CR = 4.3
FILE_RATIO_FRACTION = 0.9


# ------------------------------------------------------------------------------------------- measurements


def preprocess(x: np.ndarray, entry: dict) -> np.ndarray:
    """The manifest's recipe, independent of axcnn.data: (x / scale - mean) / std per channel, then the layout."""
    x = x.astype(np.float32)
    if x.ndim == 3:
        x = x[..., None]
    x = x / np.float32(entry["scale"])
    x = (x - np.asarray(entry["mean"], np.float32)) / np.asarray(entry["std"], np.float32)
    if entry["layout"] == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=np.float32)


def session(path: Path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def top1(path: Path, x: np.ndarray, y: np.ndarray, batch: int = 500) -> float:
    """Top-1 of the model's first output; a fixed batch dimension is fed batches of its size."""
    sess = session(path)
    inp = sess.get_inputs()[0]
    dim0 = inp.shape[0]
    bs = dim0 if isinstance(dim0, int) and dim0 > 0 else batch
    out_name = sess.get_outputs()[0].name
    correct = 0
    for i in range(0, len(x), bs):
        out = sess.run([out_name], {inp.name: x[i:i + bs]})[0]
        correct += int(np.sum(out.reshape(len(out), -1).argmax(1) == y[i:i + bs]))
    return correct / len(x)


def files_bytes(path: Path) -> int:
    """A model file plus the external data files it references, as on disk."""
    model = onnx.load(str(path), load_external_data=False)
    locations = {e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)


def layer_byte_rule(layers: list[dict]) -> list[str]:
    """Layers whose stored bytes exceed 1.02 x Eq.1 bits / 8 + 16 (Eq.1 bits = weights * index_bits + k * bits)."""
    bad = []
    for layer in layers:
        eq1 = layer["weights"] * layer["index_bits"] + layer["k"] * layer["bits"]
        if layer["stored_bytes"] > 1.02 * eq1 / 8 + 16:
            bad.append(f"{layer['name']}: {layer['stored_bytes']} B > 1.02 x {eq1 / 8:.0f} + 16")
    return bad


def _first_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def compress_command(model: Path, data: Path, entry: dict, flags: list[str], out: Path, report: Path
                     ) -> tuple[list[str], dict]:
    """The CLI command a user would type for a manifest model (its preprocessing as flags), and the environment
    that runs this checkout's axcnn."""
    cmd = [sys.executable, "-m", "axcnn.cli", "compress", str(model), "--data", str(data),
           "--scale", repr(entry["scale"]), "--mean", ",".join(map(repr, entry["mean"])),
           "--std", ",".join(map(repr, entry["std"])), "--layout", entry["layout"], *flags,
           "-o", str(out), "--report", str(report), "-q"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return cmd, env


def run_compress(cmd: list[str], env: dict, cwd: Path, row: dict) -> bool:
    """Run a compress command; record its wall time, its exit as ``checks.compress`` and any error in ``row``."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd)
    row["compress_wall_s"] = time.perf_counter() - t
    row["checks"]["compress"] = proc.returncode == 0
    if proc.returncode != 0:
        row["errors"].append(f"compress exit {proc.returncode}: {_first_line(proc.stderr or proc.stdout)}")
    return proc.returncode == 0


class Bench:
    def __init__(self, realdata: Path, workdir: Path):
        self.realdata = realdata
        self.workdir = workdir
        self.manifest = json.loads((realdata / "manifest.json").read_text())
        self._data: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._original: dict[str, dict] = {}

    def data(self, dataset: str) -> tuple[np.ndarray, np.ndarray]:
        if dataset not in self._data:
            with np.load(self.realdata / self.manifest["datasets"][dataset]["file"]) as npz:
                self._data[dataset] = (npz["x"], npz["y"].astype(np.int64))
        return self._data[dataset]

    def original(self, name: str) -> dict:
        """Our own top-1 of the uncompressed model on the full test set (measured once per model)."""
        if name not in self._original:
            entry = self.manifest["models"][name]
            x_raw, y = self.data(entry["dataset"])
            t = time.perf_counter()
            acc = top1(self.realdata / entry["file"], preprocess(x_raw, entry), y)
            self._original[name] = {"top1": acc, "eval_s": time.perf_counter() - t,
                                    "bytes": files_bytes(self.realdata / entry["file"])}
        return self._original[name]

    def run(self, name: str, flags: list[str], tag: str) -> dict:
        entry = self.manifest["models"][name]
        model = self.realdata / entry["file"]
        data = self.realdata / self.manifest["datasets"][entry["dataset"]]["file"]
        out = self.workdir / f"{name}.{tag}.onnx"
        rep_path = self.workdir / f"{name}.{tag}.json"
        cmd, env = compress_command(model, data, entry, flags, out, rep_path)
        row: dict = {"model": name, "run": tag, "flags": " ".join(flags), "dataset": entry["dataset"],
                     "reference_top1": entry["reference_top1"], "checks": {}, "errors": []}
        print(f"[{dt.datetime.now():%H:%M:%S}] {name} ({tag}): compress ...", flush=True)
        if not run_compress(cmd, env, self.workdir, row):
            return row
        rep = json.loads(rep_path.read_text())
        row.update(
            compression_ratio=rep["compression_ratio"], layers=len(rep["layers"]),
            k=sorted({layer["k"] for layer in rep["layers"]}), report_reference=rep["reference_score"],
            report_final=rep["final_score"], report_samples=rep["samples"],
            report_bytes_before=rep["file_bytes_before"], report_bytes_after=rep["file_bytes_after"],
            report_file_ratio=rep["file_ratio"], report_total_s=rep["timing"]["total_s"],
        )
        try:
            onnx.checker.check_model(str(out), full_check=True)
            row["checks"]["checker"] = True
        except Exception as exc:  # any checker failure is a finding
            row["checks"]["checker"] = False
            row["errors"].append(f"checker: {_first_line(str(exc))}")
        orig = self.original(name)
        x_raw, y = self.data(entry["dataset"])
        t = time.perf_counter()
        try:
            shared = top1(out, preprocess(x_raw, entry), y)
            row["checks"]["runs"] = True
        except Exception as exc:
            row["checks"]["runs"] = False
            row["errors"].append(f"onnxruntime: {_first_line(str(exc))}")
            return row
        row["eval_s"] = time.perf_counter() - t
        row.update(original_top1=orig["top1"], shared_top1=shared, eval_samples=len(y),
                   loss_pp=(orig["top1"] - shared) * 100,
                   loss_vs_manifest_pp=None if entry["reference_top1"] is None
                   else (entry["reference_top1"] - shared) * 100,
                   bytes_before=orig["bytes"], bytes_after=files_bytes(out))
        row["file_ratio"] = row["bytes_before"] / row["bytes_after"]
        bad = layer_byte_rule(rep["layers"])
        row["checks"]["layer_bytes"] = not bad
        row["errors"] += bad
        for what, own in (("before", row["bytes_before"]), ("after", row["bytes_after"])):
            if rep[f"file_bytes_{what}"] != own:
                row["errors"].append(f"note: report file_bytes_{what} = {rep[f'file_bytes_{what}']:,} but the "
                                     f"files on disk hold {own:,} bytes")
        if entry["reference_top1"] is not None and abs(orig["top1"] - entry["reference_top1"]) > 5e-4:
            row["errors"].append(f"note: our original top-1 {orig['top1']:.4f} differs from the manifest's "
                                 f"{entry['reference_top1']:.4f}")
        if tag == "main":
            row["checks"]["loss<=1pp"] = row["loss_pp"] <= MAX_LOSS_PP
            if name == "cifar10_resnet20":
                row["checks"][f"CR>={RESNET20_MIN_CR}"] = rep["compression_ratio"] >= RESNET20_MIN_CR
        else:
            row["checks"]["file>=0.9CR"] = row["file_ratio"] >= FILE_RATIO_FRACTION * rep["compression_ratio"]
        return row


def unlabelled_skip(bench: Bench, name: str) -> dict:
    """A model without a labelled set is skipped unless some shipped image set has its input shape."""
    entry = bench.manifest["models"][name]
    dims = [d.dim_value for d in onnx.load(str(bench.realdata / entry["file"]), load_external_data=False)
            .graph.input[0].type.tensor_type.shape.dim]
    hwc = tuple(dims[2:] + dims[1:2]) if entry["layout"] == "NCHW" else tuple(dims[1:])
    fits = [k for k, d in bench.manifest["datasets"].items() if tuple(d["shape"]) == hwc]
    why = (f"no labelled data; input {dims} needs images {list(hwc)} (HWC) and the shipped sets are "
           + ", ".join(f"{k} {d['shape']}" for k, d in bench.manifest["datasets"].items())
           + "; resizing them would not make a meaningful acceptance check")
    return {"model": name, "run": "skipped", "skipped": why if not fits else None, "fits": fits,
            "checks": {}, "errors": []}


# ------------------------------------------------------------------------------------------------ output


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table(rows: list[dict]) -> str:
    headers = ["model", "run", "K", "CR", "ref", "orig", "shared", "loss pp", "vs ref pp", "bytes before",
               "bytes after", "file x", "file/CR", "wall s", "result"]
    lines = []
    for r in rows:
        if r["run"] == "skipped":
            lines.append([r["model"], "skipped"] + ["-"] * 12 + ["skipped"])
            continue
        k = r.get("k")
        cr = r.get("compression_ratio")
        fr = r.get("file_ratio")
        failed = [c for c, ok in r["checks"].items() if not ok]
        lines.append([
            r["model"], r["run"], "-" if not k else f"{k[0]}-{k[-1]}" if len(k) > 1 else str(k[0]),
            _f(cr, ".2f"), _f(r.get("reference_top1"), ".4f"), _f(r.get("original_top1"), ".4f"),
            _f(r.get("shared_top1"), ".4f"), _f(r.get("loss_pp"), "+.2f"), _f(r.get("loss_vs_manifest_pp"), "+.2f"),
            _f(r.get("bytes_before"), ","), _f(r.get("bytes_after"), ","), _f(fr, ".2f"),
            "-" if fr is None or not cr else f"{fr / cr:.2f}", _f(r.get("compress_wall_s"), ".1f"),
            "PASS" if not failed else "FAIL: " + ",".join(failed),
        ])
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) if i < 3 or i == len(x) - 1 else c.rjust(w) for i, (c, w) in
                      enumerate(zip(x, widths, strict=True))) for x in lines]
    return "\n".join(out)


def git_state() -> str | None:
    """The repository's commit, with "+dirty" when axcnn/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "axcnn"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--realdata", type=Path, default=DEFAULT_REALDATA, help="folder with manifest.json")
    ap.add_argument("--workdir", type=Path, help="keep the written models and reports here (default: a temp dir)")
    ap.add_argument("--models", help="comma-separated subset of the manifest's models")
    ap.add_argument("--no-filesize", action="store_true", help="skip the --kmin 4 --kmax 16 file-size runs")
    ap.add_argument("--json", type=Path, help="write all measurements here")
    args = ap.parse_args(argv)

    if not (args.realdata / "manifest.json").is_file():
        print(f"{args.realdata}/manifest.json not found; nothing to check", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="axcnn-realdata-"))
    workdir.mkdir(parents=True, exist_ok=True)
    bench = Bench(args.realdata, workdir.resolve())
    names = list(bench.manifest["models"])
    if args.models:
        wanted = args.models.split(",")
        unknown = set(wanted) - set(names)
        if unknown:
            ap.error(f"unknown models: {', '.join(sorted(unknown))}")
        names = [n for n in names if n in wanted]

    started = dt.datetime.now().astimezone()
    print(f"axcnn at {git_state()}, {started:%Y-%m-%d %H:%M %Z}", flush=True)
    t0 = time.perf_counter()
    rows = []
    for name in names:
        if bench.manifest["models"][name]["dataset"] is None:
            rows.append(unlabelled_skip(bench, name))
            continue
        rows.append(bench.run(name, MAIN_FLAGS, "main"))
    if not args.no_filesize:
        for name in FILESIZE_MODELS:
            if name in names:
                rows.append(bench.run(name, FILESIZE_FLAGS, "k4-16"))

    print()
    print(table(rows))
    for r in rows:
        for e in r["errors"]:
            print(f"  {r['model']} ({r['run']}): {e}")
        if r.get("skipped"):
            print(f"  {r['model']}: skipped: {r['skipped']}")
    failed = [(r["model"], r["run"], c) for r in rows for c, ok in r["checks"].items() if not ok]
    total_s = time.perf_counter() - t0
    kept = f"outputs kept in {workdir}" if args.workdir else "outputs removed (--workdir keeps them)"
    print(f"\n{len(rows)} rows, {len(failed)} failed checks, {total_s / 60:.1f} min; {kept}")
    if args.json:
        args.json.write_text(json.dumps({
            "date": started.isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "main_flags": " ".join(MAIN_FLAGS), "filesize_flags": " ".join(FILESIZE_FLAGS),
            "commit": git_state(),
            "environment": {"python": platform.python_version(), "onnxruntime": ort.__version__,
                            "onnx": onnx.__version__, "numpy": np.__version__, "cpus": os.cpu_count(),
                            "machine": platform.machine()},
            "total_s": total_s, "rows": rows, "failed": failed,
        }, indent=2, default=str))
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
