"""How well do the ``inertia`` and ``kl`` estimators rank a layer's candidates? (evidence for docs/estimators.md)

    python bench/estimators.py [--model cifar10_resnet20:0,6,10,16,19 --model mnist_cnn_baskov]
                               [--ranges 4:24,40:80] [--limit 2000] [--calib 256] [--outcome F] [--json OUT]

Every candidate K of the chosen layers is fully scored (``filter=1.0``, ``early_stop=False``, ``estimator="kl"``,
so each candidate carries its k-means inertia, its KL estimate and its true score). The greedy search then fixes
the best K of each layer before moving on, exactly as ``compress`` does. Per layer and estimator it prints:

- the Spearman rank correlation between the estimate (negated: lower is better) and the true score;
- the rank of the best candidate in the estimator's order (1 = the estimator put it first); the top-``f``
  fraction scored by ``compress --filter f`` contains it iff that rank <= ceil(f * candidates);
- whether the top 5%, 15% and 33% contain a best candidate, and the points of top-1 lost when they do not.

``--outcome F`` then also runs whole ``compress`` runs (all layers, early stopping on) with each estimator at
``filter=F`` and prints their final loss, Eq. 1 compression ratio and cost: the practical consequence.

"Best" = a candidate with the highest score (when several tie, any of them). ``--model KEY:i,j`` explores only the
layers with those inventory indices (the others stay dense); ``KEY`` alone explores all layers with ``compress``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
try:
    import axcnn  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from axcnn import score  # noqa: E402
from axcnn.api import compress  # noqa: E402
from axcnn.config import CompressConfig  # noqa: E402
from axcnn.data import Preprocess, load_npz, prepare, stratified_subset  # noqa: E402
from axcnn.explore import Explorer  # noqa: E402
from axcnn.model import inventory, io_info, load_model  # noqa: E402
from axcnn.search.greedy import greedy  # noqa: E402

REALDATA = REPO.parent / "shared" / "realdata"
FRACTIONS = (0.05, 0.15, 0.33)


def rankdata(a: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties averaged."""
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = np.arange(len(a), dtype=np.float64)
    for v in np.unique(a):
        tie = a == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = rankdata(a), rankdata(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def keep(n: int, fraction: float) -> int:
    """Candidates ``compress --filter fraction`` scores out of ``n`` (CompressConfig.candidates_to_score)."""
    return max(1, min(n, math.ceil(fraction * n - 1e-9)))


def layer_figures(name: str, weights: int, cands: list[dict]) -> dict:
    ks = np.array([c["k"] for c in cands])
    scores = np.array([c["score"] for c in cands], dtype=np.float64)
    best = scores.max()
    greedy_k = int(min(k for k, s in zip(ks, scores, strict=True) if s == best))
    out = {"layer": name, "weights": weights, "candidates": len(cands), "best_k": greedy_k,
           "best_score": float(best), "spread_pp": float((best - scores.min()) * 100),
           "inertia_monotone": bool(np.all(np.diff([c["inertia"] for c in sorted(cands, key=lambda c: c["k"])])
                                           <= 0))}
    for est in ("inertia", "kl"):
        values = np.array([c[est] for c in cands], dtype=np.float64)
        order = sorted(range(len(cands)), key=lambda i: (values[i], ks[i]))  # as axcnn.estimate.rank
        rank_of_best = 1 + next(pos for pos, i in enumerate(order) if scores[i] == best)
        out[est] = {
            "spearman": spearman(-values, scores),
            "rank_of_best": rank_of_best,
            "top": {str(f): {"contains_best": rank_of_best <= keep(len(cands), f),
                             "lost_pp": float((best - max(scores[i] for i in order[:keep(len(cands), f)])) * 100)}
                    for f in FRACTIONS},
        }
    return out


def run(model_key: str, layer_idx: list[int] | None, kmin: int, kmax: int, args) -> dict:
    manifest = json.loads((REALDATA / "manifest.json").read_text())
    entry = manifest["models"][model_key]
    model_path = REALDATA / entry["file"]
    data_path = REALDATA / manifest["datasets"][entry["dataset"]]["file"]
    pre = Preprocess(scale=entry["scale"], mean=entry["mean"], std=entry["std"], layout=entry["layout"])
    cfg = CompressConfig(kmin=kmin, kmax=kmax, filter=1.0, early_stop=False, estimator="kl", calib=args.calib,
                         limit=args.limit, seed=0)
    t0 = time.perf_counter()
    if layer_idx is None:  # every layer: the public entry point
        with tempfile.TemporaryDirectory(prefix="axcnn-est-") as tmp:
            rep = compress(model_path, data_path, Path(tmp) / "out.onnx", None, cfg, pre).report
        layers = [(layer["name"], layer["weights"], layer["candidates"]) for layer in rep["layers"]]
        samples = rep["samples"]
    else:  # a few layers: compress's own set-up and greedy search, restricted to those layers
        model = load_model(model_path)
        io = io_info(model)
        specs, _ = inventory(model, cfg.min_weights)
        x_raw, y_raw = load_npz(data_path)
        data = prepare(x_raw, y_raw, pre, io.input_shape, io.input_dtype)
        if cfg.limit is not None and cfg.limit < len(data):
            data = data.subset(stratified_subset(data.y, cfg.limit, cfg.seed))
        explorer = Explorer(model, io, data.x, data.y, cfg, score.select_providers(cfg.device))  # calib as compress
        exploration = greedy(explorer, [specs[i] for i in layer_idx])
        layers = [(d.spec.name, d.spec.weights,
                   [{"k": c.k, "inertia": c.inertia, "estimate": c.estimate, "score": c.score} for c in d.candidates])
                  for d in exploration.decisions]
        samples = exploration.samples
    seconds = time.perf_counter() - t0
    figures = []
    for name, weights, cands in layers:
        if len(cands) < 2:
            continue
        cands = [{"k": c["k"], "inertia": c["inertia"], "kl": c["estimate"], "score": c["score"]} for c in cands]
        figures.append(layer_figures(name, weights, cands) | {"raw": cands})
    return {"model": model_key, "kmin": kmin, "kmax": kmax, "samples": samples, "seconds": seconds,
            "layers": figures}


def outcome(model_key: str, kmin: int, kmax: int, fraction: float, args) -> list[dict]:
    """Whole ``compress`` runs (every layer, early stopping on) with each estimator at ``fraction``."""
    manifest = json.loads((REALDATA / "manifest.json").read_text())
    entry = manifest["models"][model_key]
    pre = Preprocess(scale=entry["scale"], mean=entry["mean"], std=entry["std"], layout=entry["layout"])
    rows = []
    for est in ("inertia", "kl"):
        cfg = CompressConfig(kmin=kmin, kmax=kmax, filter=fraction, estimator=est, calib=args.calib,
                             limit=args.limit, seed=0)
        with tempfile.TemporaryDirectory(prefix="axcnn-est-") as tmp:
            rep = compress(REALDATA / entry["file"], REALDATA / manifest["datasets"][entry["dataset"]]["file"],
                           Path(tmp) / "out.onnx", None, cfg, pre).report
        t = rep["timing"]
        rows.append({"model": model_key, "kmin": kmin, "kmax": kmax, "filter": fraction, "estimator": est,
                     "loss_pp": rep["accuracy_loss_pp"], "compression_ratio": rep["compression_ratio"],
                     "candidates": t["candidates_scored"], "cost_t_pass": t["cost_t_pass"],
                     "estimate_s": t["estimate_s"], "scoring_s": t["scoring_s"],
                     "ks": [layer["k"] for layer in rep["layers"]]})
    return rows


def table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    print(f"\n## {title}")
    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))


def cell(top: dict) -> str:
    return "yes" if top["contains_best"] else f"no -{top['lost_pp']:.2f}"


def report(result: dict) -> None:
    rows = []
    for f in result["layers"]:
        rows.append([f["layer"], str(f["weights"]), str(f["candidates"]), f"{f['spread_pp']:.2f}", str(f["best_k"]),
                     f"{f['inertia']['spearman']:+.2f}", f"{f['kl']['spearman']:+.2f}",
                     str(f["inertia"]["rank_of_best"]), str(f["kl"]["rank_of_best"]),
                     *(f"{cell(f['inertia']['top'][str(x)])} / {cell(f['kl']['top'][str(x)])}" for x in FRACTIONS)])
    table(f"{result['model']}, K {result['kmin']}..{result['kmax']}, {result['samples']} samples "
          f"({result['seconds']:.0f} s)",
          ["layer", "weights", "cands", "spread pp", "best K", "rho inertia", "rho kl", "rank inertia", "rank kl",
           *(f"top {round(x * 100)}% inertia / kl" for x in FRACTIONS)], rows)
    mono = all(f["inertia_monotone"] for f in result["layers"])
    print(f"inertia falls monotonically in K in {'every' if mono else 'NOT every'} layer "
          f"(so inertia ranking = largest K first)")


def summary(results: list[dict]) -> None:
    rows = []
    for r in results:
        n = len(r["layers"])
        row = [f"{r['model']} K {r['kmin']}..{r['kmax']}", str(n)]
        for est in ("inertia", "kl"):
            rhos = [f[est]["spearman"] for f in r["layers"] if not math.isnan(f[est]["spearman"])]
            row.append(f"{np.mean(rhos):+.2f}" if rhos else "-")
        for x in FRACTIONS:
            for est in ("inertia", "kl"):
                tops = [f[est]["top"][str(x)] for f in r["layers"]]
                hits = sum(t["contains_best"] for t in tops)
                row.append(f"{hits}/{n} ({sum(t['lost_pp'] for t in tops):.2f})")
        rows.append(row)
    table("Summary: mean Spearman rho; layers whose top fraction contains a best candidate (sum of pp lost)",
          ["run", "layers", "rho inertia", "rho kl",
           *(f"top {round(x * 100)}% {est}" for x in FRACTIONS for est in ("inertia", "kl"))], rows)


def parse_model(spec: str) -> tuple[str, list[int] | None]:
    key, _, idx = spec.partition(":")
    return key, [int(i) for i in idx.split(",")] if idx else None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", metavar="KEY[:i,j,...]",
                   help="manifest key, optionally with inventory indices of the layers to explore (repeatable)")
    p.add_argument("--ranges", default="4:24,40:80", help="K ranges kmin:kmax, comma-separated")
    p.add_argument("--limit", type=int, default=2000, help="stratified scoring subset (default 2000)")
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--outcome", type=float, metavar="F",
                   help="also run whole compress runs (all layers) with each estimator at --filter F and compare "
                        "the final loss, compression ratio and cost")
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    models = [parse_model(m) for m in (args.model or ["cifar10_resnet20:0,6,10,16,19", "mnist_cnn_baskov"])]
    ranges = [tuple(int(v) for v in r.split(":")) for r in args.ranges.split(",")]
    print(f"python bench/estimators.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(f"filter=1.0, early_stop=False, estimator=kl, calib {args.calib}, limit {args.limit}; cells of the top-f "
          "columns: inertia / kl, 'yes' or 'no -X' with X = points of top-1 lost")
    results = []
    for key, idx in models:
        for kmin, kmax in ranges:
            print(f"... {key} layers {idx if idx else 'all'}, K {kmin}..{kmax}", file=sys.stderr, flush=True)
            results.append(run(key, idx, kmin, kmax, args))
            report(results[-1])
    summary(results)
    outcomes = []
    if args.outcome:
        for key, _ in models:
            for kmin, kmax in ranges:
                print(f"... compress {key}, K {kmin}..{kmax}, filter {args.outcome}", file=sys.stderr, flush=True)
                outcomes += outcome(key, kmin, kmax, args.outcome, args)
        table(f"Whole compress runs, filter {args.outcome} (all layers, early stopping on): the outcome",
              ["run", "estimator", "loss pp", "Eq.1 CR", "cands", "est s", "score s", "cost T_pass", "K per layer"],
              [[f"{o['model']} K {o['kmin']}..{o['kmax']}", o["estimator"], f"{o['loss_pp']:+.2f}",
                f"{o['compression_ratio']:.2f}", str(o["candidates"]), f"{o['estimate_s']:.0f}",
                f"{o['scoring_s']:.0f}", f"{o['cost_t_pass']:.1f}", ",".join(map(str, o["ks"]))]
               for o in outcomes])
    if args.json:
        Path(args.json).write_text(json.dumps({"studies": results, "outcomes": outcomes}, indent=1) + "\n")


if __name__ == "__main__":
    main()
