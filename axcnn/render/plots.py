"""PNG plots of a report dict, drawn with matplotlib (the optional ``plots`` extra, imported lazily).

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas directly, never pyplot: no global state,
no GUI backend switched under a caller's feet. Each function returns PNG bytes, or None when the report has
nothing to draw for it (a first-round report has no front and no sensitivity table).
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass

from axcnn.errors import MissingBackendError
from axcnn.render.common import (
    budget_text,
    chosen_point,
    front,
    is_chosen_entry,
    is_num,
    sensitivity,
    sensitivity_curves,
    short_name,
)

log = logging.getLogger(__name__)

DPI = 100
WIDTH = 11.0  # inches: 1100 px at DPI, the width of the HTML page's content column
INDEX = "#3b6ea8"  # index bits
CENTROIDS = "#e0a030"  # centroid table
CHOSEN = "#c0392b"
MAX_PANELS = 12
NAMES = ("layers", "front", "sensitivity", "candidates")  # file stems, in reading order


@dataclass(frozen=True)
class Plot:
    """One figure: a file-name stem, a title, a caption saying what is drawn and from which fields, the PNG."""

    name: str
    title: str
    caption: str
    png: bytes


def available() -> bool:
    try:
        _mpl()
    except MissingBackendError:
        return False
    return True


def _mpl():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingBackendError("matplotlib", "plots") from exc
    return Figure, FigureCanvasAgg


def _figure(height: float, **kwargs):
    Figure, FigureCanvasAgg = _mpl()
    fig = Figure(figsize=(WIDTH, height), dpi=DPI, layout="constrained", **kwargs)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def plots(rep: dict) -> list[Plot]:
    """Every plot this report has data for, in reading order. Raises MissingBackendError without matplotlib."""
    _mpl()
    out = []
    for name, title, fn, caption in (
        ("layers", "Where the bits went", layers_png,
         "Left: bytes stored per layer, index bits (blue) and centroid table (orange), labelled with K and "
         "the index width. Right: each layer's compression ratio (Eq. 1); the dashed line is the whole model's."),
        ("front", "Pareto front", front_png,
         "Accuracy loss against compression ratio (Eq. 1) for each point of the front; the chosen point is the "
         "red star. Filled markers were measured on the verification samples, hollow ones on the selection "
         "samples; dashed lines are the budget."),
        ("sensitivity", "Sensitivity to K", sensitivity_png,
         "The sensitivity proxy of each layer against K (both on log scales): how much the output moves when "
         "that layer alone is clustered to K values. Ringed points are the K written."),
        ("candidates", "Candidates per layer", candidates_png,
         "The estimator's value for every K explored, per layer; scored candidates are marked: a dot when scored "
         "on every sample, a cross when the race stopped it early, a red star for the K written."),
    ):
        try:
            png = fn(rep)
        except (ValueError, TypeError, KeyError, AttributeError, ZeroDivisionError) as exc:
            # a malformed field must not cost the reader the tables: say which plot is missing and why
            log.warning("the %s plot could not be drawn (%s: %s)", name, type(exc).__name__, exc)
            log.debug("plot failure", exc_info=True)
            continue
        if png is not None:
            out.append(Plot(name, title, caption, png))
    return out


def _layer_labels(layers: list[dict]) -> list[str]:
    return [short_name(str(layer.get("name", "?")), 28) for layer in layers]


def layers_png(rep: dict) -> bytes | None:
    layers = [x for x in rep.get("layers") or [] if isinstance(x, dict)]
    if not layers:
        return None
    n = len(layers)
    fig = _figure(max(2.4, 0.34 * n + 1.3))
    left, right = fig.subplots(1, 2, sharey=True, width_ratios=[2.2, 1])
    y = list(range(n))
    index = [float(x.get("index_bytes") or 0) for x in layers]
    cents = [float(x.get("centroid_bytes") or 0) for x in layers]
    if not any(index) and not any(cents):  # older records: only the total
        index = [float(x.get("stored_bytes") or 0) for x in layers]
    left.barh(y, index, color=INDEX, label="index bits")
    left.barh(y, cents, left=index, color=CENTROIDS, label="centroid table")
    top = max(a + b for a, b in zip(index, cents, strict=True)) or 1.0
    for i, x in enumerate(layers):
        label = f"K={_or(x.get('k'))} · {_or(x.get('index_bits'))}-bit index"
        if (x.get("vector_dim") or 1) > 1:
            label += f" per {x['vector_dim']} weights"
        left.text(index[i] + cents[i] + top * 0.01, i, label, va="center", fontsize=8.5, color="#333")
    left.set_xlim(0, top * 1.45)
    left.set_xlabel("bytes stored")
    left.set_title("stored bytes per layer", fontsize=11, loc="left")
    left.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, fontsize=8.5, frameon=False, borderaxespad=0.2)
    left.set_yticks(y, _layer_labels(layers), fontsize=9)
    left.invert_yaxis()
    left.xaxis.set_major_formatter(_thousands())
    crs = [x.get("compression_ratio") if is_num(x.get("compression_ratio")) else 0.0 for x in layers]
    right.barh(y, crs, color="#5a9e6f", zorder=2)
    for i, c in enumerate(crs):  # a white box keeps the model line from striking the figure through
        right.text(c, i, f" {c:.2f}x", va="center", fontsize=8.5, color="#333", zorder=4,
                   bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.6})
    xlabel = "compression ratio (Eq. 1)"
    if is_num(rep.get("compression_ratio")):
        right.axvline(rep["compression_ratio"], color="#333", ls="--", lw=1, zorder=1)
        xlabel += f"\ndashed: whole model, {rep['compression_ratio']:.2f}x"
    right.set_xlim(0, max(crs + [rep.get("compression_ratio") or 0]) * 1.3 or 1)
    right.set_xlabel(xlabel)
    right.set_title("compression ratio per layer", fontsize=11, loc="left")
    for ax in (left, right):
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(axis="y", length=0)
    return _png(fig)


def _or(v, default: str = "?") -> str:
    return default if v is None else str(v)


def _thousands():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:,.0f}")


def front_png(rep: dict) -> bytes | None:
    points = [p for p in front(rep) if is_num(p.get("compression_ratio")) and is_num(p.get("accuracy_loss_pp"))]
    if not points:
        return None
    points.sort(key=lambda p: p["compression_ratio"])
    fig = _figure(4.6)
    ax = fig.subplots()
    xs = [p["compression_ratio"] for p in points]
    ys = [p["accuracy_loss_pp"] for p in points]
    ax.plot(xs, ys, color="#888", lw=1, zorder=1)
    for on, filled in (("verification", True), ("selection", False)):
        sel = [p for p in points if (p.get("measured_on") == "verification") == filled]
        if sel:
            ax.scatter([p["compression_ratio"] for p in sel], [p["accuracy_loss_pp"] for p in sel], s=36, zorder=2,
                       facecolors=INDEX if filled else "white", edgecolors=INDEX, label=f"measured on {on}")
    c = chosen_point(rep)
    if c is not None and is_num(c.get("compression_ratio")) and is_num(c.get("accuracy_loss_pp")):
        ci = ((rep.get("evaluation") or {}).get("verification") or {}).get("ci95_pp")
        if c.get("measured_on") == "verification" and isinstance(ci, list) and len(ci) == 2 and all(map(is_num, ci)):
            ax.errorbar([c["compression_ratio"]], [c["accuracy_loss_pp"]], zorder=3, color=CHOSEN, capsize=4,
                        yerr=[[max(0.0, c["accuracy_loss_pp"] - ci[0])], [max(0.0, ci[1] - c["accuracy_loss_pp"])]],
                        lw=1.2, label="95% CI (verification)")
        ax.scatter([c["compression_ratio"]], [c["accuracy_loss_pp"]], marker="*", s=260, color=CHOSEN, zorder=4,
                   edgecolors="white", linewidths=0.8, label="chosen")
        ax.annotate(f"chosen: {c['compression_ratio']:.2f}x, {c['accuracy_loss_pp']:.2f} pp",
                    (c["compression_ratio"], c["accuracy_loss_pp"]), xytext=(10, 12), textcoords="offset points",
                    fontsize=9.5, color=CHOSEN, fontweight="bold")
    b = rep.get("budget") if isinstance(rep.get("budget"), dict) else {}
    if is_num(b.get("max_loss_pp")):
        ax.axhline(b["max_loss_pp"], color="#555", ls="--", lw=1, label=f"max loss {b['max_loss_pp']:.2f} pp")
    if is_num(b.get("target_cr")):
        ax.axvline(b["target_cr"], color="#555", ls=":", lw=1, label=f"target CR {b['target_cr']:.2f}x")
    ax.set_xlabel("compression ratio (Eq. 1)")
    ax.set_ylabel("accuracy loss (pp)")
    title = "loss against compression"
    if budget_text(rep):
        title += f" (budget {budget_text(rep)})"
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8.5, loc="upper left", frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def sensitivity_png(rep: dict) -> bytes | None:
    curves = sensitivity_curves(rep)
    curves = {k: [e for e in v if is_num(e.get("proxy"))] for k, v in curves.items()}
    curves = {k: v for k, v in curves.items() if v}
    if not any(e["proxy"] > 0 for v in curves.values() for e in v):
        return None
    s = sensitivity(rep) or {}
    dropped = sum(1 for v in curves.values() for e in v if e["proxy"] <= 0)
    fig = _figure(5.2)
    ax = fig.subplots()
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    n = len(curves)
    colors = ListedColormap([colormaps["viridis"](0.9 * i / max(1, n - 1)) for i in range(n)])  # no pale yellow
    many = n > 12
    for i, (key, entries) in enumerate(curves.items()):
        pos = [e for e in entries if e["proxy"] > 0]  # a zero proxy (K >= unique values) has no place on a log axis
        if not pos:
            continue
        color = colors(i)
        layer, gran, dim = key
        label = short_name(layer, 28) + (f" ({gran}, d={dim})" if gran != "layer" or dim != 1 else "")
        ax.plot([e["k"] for e in pos], [e["proxy"] for e in pos], marker="o", ms=3, lw=1.3, color=color,
                label=None if many else label)
        for e in pos:
            if is_chosen_entry(rep, e):
                ax.scatter([e["k"]], [e["proxy"]], s=90, facecolors="none", edgecolors=CHOSEN, linewidths=1.8,
                           zorder=3)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    from matplotlib.ticker import ScalarFormatter

    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("K (clusters)")
    ax.set_ylabel(f"{s.get('proxy', 'proxy')} ({s.get('unit', '?')})")
    ax.set_title(f"sensitivity of each layer to K ({s.get('samples', '?')} samples"
                 + (f"; {dropped} zero values not drawn" if dropped else "") + ")", fontsize=11)
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.scatter([], [], s=90, facecolors="none", edgecolors=CHOSEN, linewidths=1.8, label="K written")
    if many:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        sm = ScalarMappable(norm=Normalize(-0.5, n - 0.5), cmap=colors)
        fig.colorbar(sm, ax=ax, label="layer (network order, from 0)")
        ax.legend(fontsize=8.5, loc="upper right", frameon=False)
    else:
        ax.legend(fontsize=8.5, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _png(fig)


def candidates_png(rep: dict) -> bytes | None:
    layers = []
    for x in rep.get("layers") or []:
        cands = [c for c in x.get("candidates") or [] if is_num(c.get("k")) and is_num(c.get("estimate"))]
        if len(cands) >= 2:
            layers.append((x, cands))
    if not layers:
        return None
    shown = layers[:MAX_PANELS]
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    height = 2.3 * rows + 0.9
    Figure, FigureCanvasAgg = _mpl()
    fig = Figure(figsize=(WIDTH, height), dpi=DPI)  # fixed margins: constrained layout costs seconds per grid
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.55 / height, top=1 - 0.75 / height, wspace=0.35,
                        hspace=0.55)
    estimator = rep.get("estimator") or "estimate"
    for ax, (x, cands) in zip(axes.flat, shown, strict=False):
        ks = [c["k"] for c in cands]
        est = [c["estimate"] for c in cands]
        ax.plot(ks, est, color="#888", lw=1)
        if all(v > 0 for v in est) and max(est) / min(est) > 20:
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
            ax.yaxis.get_offset_text().set_fontsize(7.5)
        full = [c for c in cands if c.get("scored") and not c.get("stopped_early")]
        early = [c for c in cands if c.get("scored") and c.get("stopped_early")]
        ax.scatter([c["k"] for c in full], [c["estimate"] for c in full], s=22, color=INDEX, zorder=2)
        ax.scatter([c["k"] for c in early], [c["estimate"] for c in early], s=22, marker="x", color="#777", zorder=2)
        chosen = [c for c in cands if c["k"] == x.get("k")]
        ax.scatter([c["k"] for c in chosen], [c["estimate"] for c in chosen], s=120, marker="*", color=CHOSEN,
                   zorder=3)
        ax.set_title(short_name(str(x.get("name", "?")), 30), fontsize=9, pad=9)
        ax.tick_params(labelsize=7.5)
        ax.spines[["top", "right"]].set_visible(False)
    for ax in list(axes.flat)[len(shown):]:
        ax.set_visible(False)
    for ax in list(axes.flat)[:len(shown)]:
        ax.set_xlabel("K", fontsize=8.5, labelpad=1)
    for ax in axes[:, 0]:
        ax.set_ylabel(estimator, fontsize=8.5)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="#888", lw=1, label=f"{estimator} per K"),
               Line2D([], [], color=INDEX, marker="o", ls="", label="scored on every sample"),
               Line2D([], [], color="#777", marker="x", ls="", label="stopped early by the race"),
               Line2D([], [], color=CHOSEN, marker="*", ms=11, ls="", label="K written")]
    fig.legend(handles=handles, loc="upper center", ncol=4, fontsize=8.5, frameon=False, bbox_to_anchor=(0.5, 1.0))
    if len(layers) > len(shown):
        fig.text(0.99, 0.005, f"first {len(shown)} of {len(layers)} layers", ha="right", va="bottom", fontsize=8.5)
    return _png(fig)
