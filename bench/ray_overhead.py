#!/usr/bin/env python
"""--executor ray against local on one real run, and the wall time to expect on N workers.

1. **Overhead.** The same compress run, as a user types it, once with each executor::

       axcnn compress MODEL --data X.npz --scale S --mean .. --std .. --layout L --limit 1000 \\
           --kmin 40 --kmax 60 --filter 0.15 [--executor ray] -o OUT.onnx --report OUT.json

   Checks that both choose the same K for every layer, with the same candidate tables and final score, and prints
   the ratio of their wall times (one run each: on a shared machine, expect noise).

2. **Per-candidate costs.** The same search in this process, where each layer's race is traced: every batch of
   every candidate is also run on one onnxruntime thread (what a one-CPU Ray task gets) and timed, with the time to
   build its session; the local race itself is timed too. A no-op Ray task's round trip is measured on a local Ray.

3. **N workers.** For each layer, the Ray executor's race engine (axcnn.executor.race, the same code) is run
   against a simulated cluster of N one-CPU workers: a task takes the measured batch time, plus the session build
   when its worker has no session of that candidate, plus the measured round trip. The layer's time is when its
   race ends; the run's is that sum plus what runs on the driver (measured: the whole run less its races).

   An ImageNet-sized run is extrapolated from the same traces: a ResNet-50 is built in code (random weights, the
   torchvision layout, BN folded) and its per-image time on one thread measured here; each traced layer's batch
   times are scaled by the ResNet-50/this-model per-image ratio; each candidate's correct count is stretched from
   the subset's samples to 50,000 (its cumulative curve over the hardest-first order, interpolated), so the race
   stops at the same fractions of the samples; the traced layers are repeated to ResNet-50's 54; the driver's share
   is scaled by the sample ratio x per-image ratio (clustering by the weight ratio).

    PYTHONPATH=. python bench/ray_overhead.py --json /tmp/ray_overhead.json
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata"
sys.path.insert(0, str(REPO))

from axcnn import score  # noqa: E402
from axcnn.executor import LocalExecutor, RayExecutor, worker_runner  # noqa: E402
from axcnn.executor.race import RaceStats, parallel_best_first  # noqa: E402

WORKERS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
IMAGENET_SAMPLES = 50_000
BATCH = 256


# ------------------------------------------------------------------------------------------------ 1. the two runs


def cli_flags(entry: dict, args) -> list[str]:
    return ["--scale", repr(entry["scale"]), "--mean", ",".join(map(repr, entry["mean"])),
            "--std", ",".join(map(repr, entry["std"])), "--layout", entry["layout"], "--limit", str(args.limit),
            "--kmin", str(args.kmin), "--kmax", str(args.kmax), "--filter", str(args.filter), "-q"]


def two_runs(model: Path, data: Path, flags: list[str], workdir: Path) -> dict:
    out = {}
    for name, extra in (("local", []), ("ray", ["--executor", "ray"])):
        cmd = [sys.executable, "-m", "axcnn.cli", "compress", str(model), "--data", str(data), *flags, *extra,
               "-o", str(workdir / f"{name}.onnx"), "--report", str(workdir / f"{name}.json")]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(f"{name} run failed: {proc.stderr.strip()[-500:]}")
        out[name] = {"wall_s": wall, "report": json.loads((workdir / f"{name}.json").read_text()),
                     "command": " ".join(cmd[1:])}
    a, b = out["local"]["report"], out["ray"]["report"]
    same_k = [la["k"] for la in a["layers"]] == [lb["k"] for lb in b["layers"]]
    same_tables = all(la["candidates"] == lb["candidates"] for la, lb in zip(a["layers"], b["layers"], strict=True))
    return {
        "local_wall_s": round(out["local"]["wall_s"], 2), "ray_wall_s": round(out["ray"]["wall_s"], 2),
        "ratio_ray_over_local": round(out["ray"]["wall_s"] / out["local"]["wall_s"], 3),
        "same_k_every_layer": same_k, "same_candidate_tables": same_tables,
        "k": [la["k"] for la in a["layers"]],
        "final_score": {"local": a["final_score"], "ray": b["final_score"]},
        "scoring_s": {"local": round(a["timing"]["scoring_s"], 2), "ray": round(b["timing"]["scoring_s"], 2)},
        "total_s": {"local": round(a["timing"]["total_s"], 2), "ray": round(b["timing"]["total_s"], 2)},
        "ray_executor": b["tool"]["executor"],
        "commands": {k: v["command"] for k, v in out.items()},
    }


# --------------------------------------------------------------------------------------- 2. per-candidate costs


class TracingExecutor(LocalExecutor):
    """The local race, and beside it every batch of every candidate on one thread, timed."""

    def __init__(self):
        self.layers: list[dict] = []
        self.one_thread = worker_runner("cpu", threads=1)

    def race(self, plan, runner, output, candidates, labels, metric, done=None, lead=0,
             live_sessions=score.LIVE_SESSIONS):
        t0 = time.perf_counter()
        starts = np.cumsum([0, *plan.sizes])
        counts, times, builds = {}, {}, {}
        for k, array in candidates.items():
            tb = time.perf_counter()
            sess = self.one_thread.session(plan.serialize_with(array))
            builds[k] = time.perf_counter() - tb
            counts[k], times[k] = [], []
            for j, feed in enumerate(plan.feeds):
                tj = time.perf_counter()
                out = self.one_thread.run(sess, output, feed)[:plan.sizes[j]]
                times[k].append(time.perf_counter() - tj)
                counts[k].append(score.count_correct(out, labels[starts[j]:starts[j + 1]], metric))
        table_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        result = super().race(plan, runner, output, candidates, labels, metric, done, lead, live_sessions)
        race_s = time.perf_counter() - t1
        feed_bytes = sum(a.nbytes for f in plan.feeds for a in f.values())
        self.layers.append({"ks": list(candidates), "sizes": list(map(int, plan.sizes)), "lead": int(lead),
                            "counts": counts, "times": times, "builds": builds, "table_s": table_s,
                            "race_s": race_s, "kind": plan.kind, "feed_bytes": int(feed_bytes),
                            "read": sum(math.ceil(o.seen / max(plan.sizes)) for o in result.values())})
        return result


def trace(model_path: Path, data_path: Path, entry: dict, args) -> tuple[TracingExecutor, dict]:
    from axcnn.api import load_data
    from axcnn.config import CompressConfig
    from axcnn.data import Preprocess
    from axcnn.explore import Explorer
    from axcnn.model import inventory, io_info, load_model
    from axcnn.search.greedy import greedy

    config = CompressConfig(kmin=args.kmin, kmax=args.kmax, filter=args.filter, limit=args.limit)
    pre = Preprocess(scale=entry["scale"], mean=tuple(entry["mean"]), std=tuple(entry["std"]),
                     layout=entry["layout"])
    model = load_model(model_path)
    io = io_info(model)
    layers, _ = inventory(model, config.min_weights)
    data = load_data(data_path, pre, io, config)
    tracer = TracingExecutor()
    t0 = time.perf_counter()
    explorer = Explorer(model, io, data.x, data.y, config, score.select_providers("cpu"), executor=tracer)
    exploration = greedy(explorer, layers)
    total = time.perf_counter() - t0
    races = sum(layer["race_s"] for layer in tracer.layers)
    tables = sum(layer["table_s"] for layer in tracer.layers)
    clustering = sum(d.clustering_s for d in exploration.decisions)
    one_image = explorer.t_pass_s / len(data.x)
    return tracer, {"search_s": total - tables, "races_s": races, "driver_s": total - tables - races,
                    "clustering_s": clustering, "t_pass_s": explorer.t_pass_s, "per_image_s": one_image,
                    "weights": sum(s.weights for s in layers), "layers": len(layers), "samples": len(data.x)}


def round_trip(samples: int = 40) -> float:
    """Seconds for one no-op Ray task, submitted and fetched one after the other, on a local Ray of 2 CPUs."""
    with RayExecutor(num_cpus=2) as ex:
        list(ex.map(abs, range(4)))  # start the workers
        t0 = time.perf_counter()
        for i in range(samples):
            list(ex.map(abs, [i]))
        return (time.perf_counter() - t0) / samples


# --------------------------------------------------------------------------------------------- 3. N workers


def simulate(layer: dict, workers: int, overhead: float, time_scale: float = 1.0,
             sessions: int = score.LIVE_SESSIONS) -> tuple[float, RaceStats]:
    """When the race of ``layer`` ends on ``workers`` one-CPU workers (the executor's own race engine, a simulated
    clock). A worker builds a candidate's session unless it has it among its last ``sessions``."""
    now = 0.0
    idle = list(range(workers))
    caches: list[list[int]] = [[] for _ in range(workers)]
    queue: list[tuple[int, int]] = []
    running: list[tuple[float, int, int, int, int]] = []  # (finish, seq, worker, k, j)
    seq = 0

    def submit(k, j):
        queue.append((k, j))

    def land():
        nonlocal now, seq
        while queue and idle:
            k, j = queue.pop(0)
            w = idle.pop(0)
            cost = overhead + layer["times"][k][j] * time_scale
            if k not in caches[w]:
                cost += layer["builds"][k] * time_scale
                caches[w] = (caches[w] + [k])[-sessions:]
            heapq.heappush(running, (now + cost, seq, w, k, j))
            seq += 1
        finish, _, w, k, j = heapq.heappop(running)
        now = finish
        idle.append(w)
        return k, j, layer["counts"][k][j]

    stats = RaceStats()
    parallel_best_first(layer["ks"], layer["sizes"], submit, land, workers, None, layer["lead"], stats)
    return now, stats


def stretch(layer: dict, samples: int, batch: int, per_sample_s: float | None = None) -> dict:
    """The layer's race at ``samples`` samples in batches of ``batch``: each candidate's cumulative correct count
    over the hardest-first order interpolated (so it errs on the same fractions of the samples), batch times
    per sample kept, lead scaled."""
    n = sum(layer["sizes"])
    edges = np.concatenate([[0], np.cumsum(layer["sizes"])]) / n
    new_sizes = [min(batch, samples - s) for s in range(0, samples, batch)]
    new_edges = np.concatenate([[0], np.cumsum(new_sizes)]) / samples
    counts, times = {}, {}
    per_sample = {k: per_sample_s if per_sample_s is not None else sum(t) / n for k, t in layer["times"].items()}
    for k in layer["ks"]:
        cum = np.concatenate([[0], np.cumsum(layer["counts"][k])]) / n
        new_cum = np.round(np.interp(new_edges, edges, cum) * samples).astype(int)
        c = np.clip(np.diff(new_cum), 0, new_sizes)
        counts[k] = [int(v) for v in c]
        times[k] = [per_sample[k] * s for s in new_sizes]
    return {**layer, "sizes": new_sizes, "counts": counts, "times": times,
            "lead": int(round(layer["lead"] / n * samples))}


# -------------------------------------------------------------------------------------- ImageNet-sized model


def resnet50():
    """ResNet-50 (torchvision layout: bottlenecks 3-4-6-3, stride on the 3x3, BN folded into conv biases) with
    seeded random weights, input 1x3x224x224, 1000 classes."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    counter = [0]

    def conv(x, cin, cout, k, stride=1, relu=True):
        counter[0] += 1
        name = f"conv{counter[0]}"
        w = (rng.standard_normal((cout, cin, k, k)) * math.sqrt(2 / (cin * k * k))).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, name + "_w"), numpy_helper.from_array(np.zeros(cout, np.float32),
                                                                                         name + "_b")])
        nodes.append(helper.make_node("Conv", [x, name + "_w", name + "_b"], [name], strides=[stride, stride],
                                      pads=[k // 2] * 4))
        if relu:
            nodes.append(helper.make_node("Relu", [name], [name + "_r"]))
            return name + "_r"
        return name

    x = conv("x", 3, 64, 7, 2)
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    x, cin = "pool", 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
        for b in range(blocks):
            stride = 2 if b == 0 and stage > 0 else 1
            y = conv(x, cin, width, 1)
            y = conv(y, width, width, 3, stride)
            y = conv(y, width, width * 4, 1, relu=False)
            short = conv(x, cin, width * 4, 1, stride, relu=False) if b == 0 else x
            out = f"add{stage}_{b}"
            nodes.append(helper.make_node("Add", [y, short], [out]))
            nodes.append(helper.make_node("Relu", [out], [out + "_r"]))
            x, cin = out + "_r", width * 4
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    wfc = (rng.standard_normal((1000, 2048)) * 0.01).astype(np.float32)
    inits.extend([numpy_helper.from_array(wfc, "fc_w"), numpy_helper.from_array(np.zeros(1000, np.float32), "fc_b")])
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1))
    graph = helper.make_graph(nodes, "resnet50", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                 ["N", 3, 224, 224])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    weights = sum(int(np.prod(t.dims)) for t in inits if t.name.endswith("_w"))
    layers = sum(1 for t in inits if t.name.endswith("_w"))
    return model, weights, layers


def per_image_s(model, shape, images: int = 8, repeats: int = 3) -> float:
    """Seconds per image of ``model`` on one onnxruntime thread (best of ``repeats`` batches of ``images``)."""
    runner = worker_runner("cpu", threads=1)
    sess = runner.session(model)
    x = np.random.default_rng(0).standard_normal((images, *shape)).astype(np.float32)
    name = sess.get_inputs()[0].name
    out = sess.get_outputs()[0].name
    sess.run([out], {name: x})
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run([out], {name: x})
        best = min(best, time.perf_counter() - t0)
    return best / images


# ----------------------------------------------------------------------------------------------------- main


def fmt_s(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else (f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="cifar10_resnet20")
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--kmin", type=int, default=40)
    ap.add_argument("--kmax", type=int, default=60)
    ap.add_argument("--filter", type=float, default=0.15)
    ap.add_argument("--skip-runs", action="store_true", help="only the per-candidate costs and the estimate")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    manifest = json.loads((REALDATA / "manifest.json").read_text())
    entry = manifest["models"][args.model]
    model_path = REALDATA / entry["file"]
    data_path = REALDATA / manifest["datasets"][entry["dataset"]]["file"]
    result: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                    "model": args.model, "flags": cli_flags(entry, args)}

    if not args.skip_runs:
        with tempfile.TemporaryDirectory() as tmp:
            runs = two_runs(model_path, data_path, cli_flags(entry, args), Path(tmp))
        result["runs"] = runs
        print(f"local {runs['local_wall_s']:.1f} s, ray {runs['ray_wall_s']:.1f} s: ratio "
              f"{runs['ratio_ray_over_local']:.2f} (one run each); same K every layer: {runs['same_k_every_layer']}, "
              f"same candidate tables: {runs['same_candidate_tables']}, final score {runs['final_score']}")
        print(f"  ray: connect {runs['ray_executor']['connect_s']} s, batches started "
              f"{runs['ray_executor']['batches_started']}, read {runs['ray_executor']['batches_read']}")

    tracer, run = trace(model_path, data_path, entry, args)
    overhead = round_trip()
    layers = tracer.layers
    units = sum(len(layer["ks"]) * len(layer["sizes"]) for layer in layers)
    one_cpu = sum(sum(map(sum, layer["times"].values())) for layer in layers)
    read = sum(layer["read"] for layer in layers)
    print(f"\nper-candidate costs ({run['layers']} layers, {run['samples']} samples): a batch of "
          f"{max(layers[0]['sizes'])} on one thread {1000 * one_cpu / units:.1f} ms on average; a session "
          f"{1000 * np.mean([b for la in layers for b in la['builds'].values()]):.1f} ms; the local races read "
          f"{read} of {units} candidate batches; no-op Ray task round trip {1000 * overhead:.1f} ms")
    print(f"  driver (reference pass, clustering, cached activations): {run['driver_s']:.1f} s; "
          f"local races {run['races_s']:.1f} s")
    here = {}
    for n in WORKERS:
        races = sum(simulate(layer, n, overhead)[0] for layer in layers)
        here[n] = run["driver_s"] + races
    result["resnet20"] = {"run": run, "round_trip_s": overhead, "units": units, "units_read": read,
                          "unit_s_one_thread": one_cpu / units, "wall_s_on_n_workers": here}

    r50, r50_weights, r50_layers = resnet50()
    t50 = per_image_s(r50, (3, 224, 224))
    t20 = per_image_s(score.working_copy(onnx.load(str(model_path))), (3, 32, 32), images=64)
    ratio = t50 / t20
    stretched = [stretch(layers[i % len(layers)], IMAGENET_SAMPLES, BATCH) for i in range(r50_layers)]
    sample_ratio = IMAGENET_SAMPLES / run["samples"]
    driver = (run["driver_s"] - run["clustering_s"]) * sample_ratio * ratio + run["clustering_s"] * (
        r50_weights / run["weights"])
    # activations over the cache budget (at 50,000 images most of ResNet-50's are): full plans, every task runs
    # the whole network on its batch; times already in ResNet-50 seconds (time_scale 1)
    full = [stretch(layers[i % len(layers)], IMAGENET_SAMPLES, BATCH, t50) for i in range(r50_layers)]
    for layer in full:
        layer["builds"] = {k: b * ratio for k, b in layer["builds"].items()}
    imagenet, imagenet_full = {}, {}
    for n in WORKERS:
        imagenet[n] = driver + sum(simulate(layer, n, overhead, ratio)[0] for layer in stretched)
        imagenet_full[n] = driver + sum(simulate(layer, n, overhead)[0] for layer in full)
    result["imagenet"] = {"per_image_s": {"resnet50": t50, args.model: t20}, "ratio": ratio,
                          "layers": r50_layers, "weights": r50_weights, "samples": IMAGENET_SAMPLES,
                          "driver_s": driver, "wall_s_on_n_workers": imagenet,
                          "wall_s_on_n_workers_full_plans": imagenet_full}
    print(f"\nResNet-50 (built here) {1000 * t50:.1f} ms/image vs {args.model} {1000 * t20:.2f} ms/image on one "
          f"thread: x{ratio:.0f}; {r50_layers} layers, {r50_weights:,} weights")
    print(f"\n{'workers':>8} | {args.model + ' (' + str(run['samples']) + ')':>22} | "
          f"{'ResNet-50, 50k, suffix':>22} | {'ResNet-50, 50k, full':>22}")
    for n in WORKERS:
        print(f"{n:>8} | {fmt_s(here[n]):>22} | {fmt_s(imagenet[n]):>22} | {fmt_s(imagenet_full[n]):>22}")
    print(f"(driver share, serial: {fmt_s(run['driver_s'])} | {fmt_s(driver)})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
