"""Options for a compression run, as one frozen dataclass validated at construction.

This is the single source of defaults: the CLI passes on only the options the user set, and the batch TOML keys
are these field names (see :mod:`axcnn.options`). A few defaults depend on the search mode; they are resolved at
construction, so a config always holds concrete values:

=============  ======================  ==================================
option         greedy (Algorithms 1/2)  budget (--max-loss / --target-cr)
=============  ======================  ==================================
kmin, kmax     40, 80                  2, 256
holdout        0.0                     0.3
calib          256                     1024
repair         none                    scale
=============  ======================  ==================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from axcnn.options import at_least, between, opt, validate

ESTIMATORS = ("inertia", "kl")
METRICS = ("top1", "top5", "agreement")
KMEANS_BACKENDS = ("exact", "faiss", "sklearn")
DEVICES = ("auto", "cpu", "cuda")
EXECUTORS = ("local", "ray")
REPAIRS = ("none", "bias", "scale")
WEIGHTINGS = ("none", "input")
ASSIGNS = ("nearest", "gptq")
GRANULARITIES = ("layer", "channel", "kernel")  # axcnn.sharing.GRANULARITIES (config stays import-free)

#: mode -> defaults of the options whose default depends on the mode
MODE_DEFAULTS = {
    "greedy": {"kmin": 40, "kmax": 80, "holdout": 0.0, "calib": 256, "repair": "none", "granularity": "layer"},
    "budget": {"kmin": 2, "kmax": 256, "holdout": 0.3, "calib": 1024, "repair": "scale", "granularity": "layer"},
    "pareto": {"kmin": 2, "kmax": 256, "holdout": 0.3, "calib": 1024, "repair": "scale", "granularity": "layer"},
}
PICK_FORMS = "loss:PP (the largest ratio within PP points), cr:X (the most accurate at ratio >= X), index:N"


def _pick_ok(value: str) -> bool:
    kind, _, number = value.partition(":")
    try:
        x = float(number)
    except ValueError:
        return False
    if kind == "index":
        return x >= 0 and x == int(x)
    return (kind == "loss" and x >= 0) or (kind == "cr" and x >= 1)


@dataclass(frozen=True)
class CompressConfig:
    """Settings of one ``compress`` run. Each field's help text is in its declaration (and in ``--help``)."""

    kmin: int | None = opt(None, "Smallest K explored per layer.", "int", check=between(1, 65536),
                           allowed="an integer in [1, 65536]", default_text="40; 2 with a budget")
    kmax: int | None = opt(None, "Largest K explored per layer.", "int", check=between(1, 65536),
                           allowed="an integer in [1, 65536]", default_text="80; 256 with a budget")
    filter: float = opt(0.15, "Fraction of a layer's candidates fully scored, best first by the estimator; 1.0 is "
                        "the paper's Algorithm 1.", "float", check=between(0, 1, open_low=True),
                        allowed="a fraction in (0, 1]")
    estimator: str = opt("inertia", "What ranks a layer's candidates before scoring: k-means inertia (the paper) "
                         "or output KL divergence on --calib samples.", "choice", choices=ESTIMATORS)
    calib: int | None = opt(None, "Calibration samples: for --estimator kl, and for the sensitivity table and the "
                            "repair in budget modes.", "int", check=at_least(1), allowed="an integer >= 1",
                            default_text="256; 1024 with a budget")
    metric: str = opt("top1", "Score: top-1/top-5 against labels, or agreement with the original model's top-1.",
                      "choice", choices=METRICS)
    kmeans: str = opt("exact", "Clustering backend: optimal 1-D k-means, or Lloyd's algorithm in faiss/sklearn.",
                      "choice", choices=KMEANS_BACKENDS)
    device: str = opt("auto", "Where to run onnxruntime and faiss: auto uses CUDA when present, else the CPU.",
                      "choice", choices=DEVICES)
    seed: int = opt(0, "Seed for subsets, splits, calibration draws and Lloyd backends.", "int", check=at_least(0),
                    allowed="an integer >= 0")
    limit: int | None = opt(None, "Use a seeded, label-stratified subset of N samples.", "int", check=at_least(1),
                            allowed="an integer >= 1", metavar="N")
    batch_size: int = opt(256, "Samples per onnxruntime call (a model with a fixed batch size uses that).", "int",
                          check=at_least(1), allowed="an integer >= 1")
    min_weights: int = opt(64, "Leave tensors with fewer weights dense.", "int", check=at_least(1),
                           allowed="an integer >= 1")
    cache_mb: int = opt(2048, "Memory budget (MB) for cached activations used by suffix scoring.", "int",
                        check=at_least(0), allowed="an integer >= 0")
    fast_scoring: bool = opt(True, "Run only the part of the network after the explored layer, on cached "
                             "activations.", "bool", cli=False)
    early_stop: bool = opt(True, "Race candidates best-first over hardest-first samples, stopping each once it "
                           "provably cannot win.", "bool", cli=False)
    executor: str = opt("local", "Where candidates are scored: in this process, or as tasks on a Ray cluster "
                        "(pip install 'axcnn[ray]'); the choices are the same either way.", "choice",
                        choices=EXECUTORS)
    ray_address: str | None = opt(None, "The Ray cluster to score on (HOST:PORT, ray://HOST:PORT or auto); implies "
                                  "--executor ray. Default: start a local Ray, as ray.init() does.", "str",
                                  metavar="ADDRESS")
    # -- budget modes -------------------------------------------------------------------------------------------
    max_loss: float | None = opt(None, "Budget mode: the smallest model (largest Eq. 1 ratio) whose top-1 loss on "
                                 "held-out verification samples is at most PP points.", "float", check=at_least(0),
                                 allowed="a number of points >= 0", metavar="PP")
    target_cr: float | None = opt(None, "Budget mode: the most accurate model whose Eq. 1 ratio is at least X.",
                                  "float", check=at_least(1), allowed="a ratio >= 1", metavar="X")
    holdout: float | None = opt(None, "Fraction of the data held out (seeded, label-stratified) to verify the "
                                "result on samples the search never saw.", "float",
                                check=between(0, 1, open_high=True), allowed="a fraction in [0, 1)",
                                default_text="0; 0.3 with a budget")
    repair: str | None = opt(None, "After clustering a layer, refit by least squares a per-output-channel scale "
                             "(stored as a multiply after the layer) and the bias, or the bias only, so the layer's "
                             "output matches the dense one.", "choice", choices=REPAIRS,
                             default_text="none; scale with a budget")
    weighting: str = opt("none", "Data-aware clustering: weight each weight by the second moment of the input it "
                         "multiplies.", "choice", choices=WEIGHTINGS)
    assign: str = opt("nearest", "How weights get their centroid: the nearest, or GPTQ-style error feedback.",
                      "choice", choices=ASSIGNS)
    # -- Pareto mode (Algorithm 3) ----------------------------------------------------------------------------------
    pareto: bool = opt(False, "Pareto mode (the paper's Algorithm 3): measure a front of (accuracy loss, compression "
                       "ratio) networks and write the one --pick chooses.", "bool")
    beam: int = opt(10, "Pareto mode: how many networks of the predicted front are assembled and measured.", "int",
                    check=at_least(2), allowed="an integer >= 2")
    pick: str | None = opt(None, f"Pareto mode: which front point is written: {PICK_FORMS}.", "str",
                           check=_pick_ok, allowed=PICK_FORMS, default_text="loss:1")
    front_dir: str | None = opt(None, "Pareto mode: also write every front point's model into this folder.", "path",
                                metavar="DIR")
    fold_bn: bool = opt(False, "Fold BatchNormalization and per-channel Mul/Add after a Conv/Gemm into its weight "
                        "and bias before clustering.", "bool")
    # -- how weights share codebooks (axcnn.sharing) ------------------------------------------------------------
    granularity: str | None = opt(None, "One codebook per layer (the paper), per group of --group-size output "
                                  "channels, or per kernel (weights of rank >= 3; a Gemm/MatMul stays per layer, "
                                  "said in the report); auto (budget and Pareto modes): the search chooses per layer "
                                  "among one codebook, groups of --group-size channels and 2-D vectors.", "choice",
                                  choices=(*GRANULARITIES, "auto"), default_text="layer")
    group_size: int | None = opt(None, "Output channels per codebook, for channel granularity and auto (a last "
                                 "group may be smaller).", "int", check=at_least(1), allowed="an integer >= 1",
                                 metavar="G", default_text="1; 4 with auto")
    vector_dim: int = opt(1, "2: pairs of weights along the input-channel axis share a 2-D codebook entry (one "
                          "codebook per layer); 1: scalar sharing.", "int", check=lambda v: v in (1, 2),
                          allowed="1 or 2")

    def __post_init__(self) -> None:
        if (self.pick is not None or self.front_dir is not None) and self.max_loss is None \
                and self.target_cr is None:
            object.__setattr__(self, "pareto", True)  # choosing a front point, or writing them, asks for a front
        for name, value in MODE_DEFAULTS[self.mode].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        validate(self)
        if self.kmin > self.kmax:
            raise ValueError(f"kmin={self.kmin!r} is invalid: allowed at most kmax ({self.kmax})")
        if self.ray_address is not None:  # an address is only for Ray: giving one asks for it
            object.__setattr__(self, "executor", "ray")
        if self.max_loss is not None and self.target_cr is not None:
            raise ValueError(f"target_cr={self.target_cr!r} is invalid: allowed None when max_loss is set "
                             "(give one budget)")
        if self.pareto and (self.max_loss is not None or self.target_cr is not None):
            raise ValueError("pareto=True is invalid: allowed False with --max-loss or --target-cr (a front, or a "
                             "budget)")
        if not self.pareto and (self.pick is not None or self.front_dir is not None):
            name = "pick" if self.pick is not None else "front_dir"
            raise ValueError(f"{name}={getattr(self, name)!r} is invalid: allowed only in Pareto mode, not with "
                             "--max-loss or --target-cr")
        self._check_sharing()

    def _check_sharing(self) -> None:
        if self.group_size is None:
            object.__setattr__(self, "group_size", 4 if self.granularity == "auto" else 1)
        elif self.group_size != 1 and self.granularity not in ("channel", "auto"):
            raise ValueError(f"group_size={self.group_size!r} is invalid with granularity={self.granularity!r}: "
                             "allowed 1 (groups of output channels are for granularity 'channel' or 'auto')")
        if self.granularity == "auto" and self.mode == "greedy":
            raise ValueError("granularity='auto' is invalid without a budget or --pareto: allowed layer | channel | "
                             "kernel (the greedy search takes one granularity)")
        if self.vector_dim != 1 and self.granularity not in ("layer", "auto"):
            raise ValueError(f"vector_dim={self.vector_dim!r} is invalid with granularity={self.granularity!r}: "
                             "allowed 1 (vectors share one codebook per layer: granularity 'layer')")
        if self.granularity != "layer" or self.vector_dim != 1:
            if self.kmeans != "exact":
                raise ValueError(f"kmeans={self.kmeans!r} is invalid with granularity={self.granularity!r}, "
                                 f"vector_dim={self.vector_dim}: allowed 'exact' (groups are solved exactly, vectors "
                                 "by axcnn's own k-means)")

    @property
    def mode(self) -> str:
        if self.pareto:
            return "pareto"
        return "budget" if self.max_loss is not None or self.target_cr is not None else "greedy"

    def candidates_to_score(self, n_candidates: int) -> int:
        """How many of a layer's ``n_candidates`` get fully scored: the best ``filter`` fraction, at least one."""
        return max(1, min(n_candidates, math.ceil(self.filter * n_candidates - 1e-9)))

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
