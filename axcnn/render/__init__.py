"""Reports people read: a report JSON dict rendered as a terminal table, Markdown, one HTML page, or JSON.

Renderers read only the dict (never the model or the data), so a report from another machine renders the same.
Every field planned for schema 2 is optional: a first-round report renders, and the new fields show when present.

The seams::

    load(path) -> dict                      read and check a report file (AxcnnError when it is not one)
    check(report) -> dict                   the same check on a dict already in memory
    render(report, fmt) -> str              text for stdout; "html" embeds its plots
    write(report, fmt, path) -> list[Path]  write atomically; "markdown" also writes PNGs to PATH-STEM_plots/
    default_path(report_path, fmt) -> Path  where "html" goes without -o: beside the JSON

One module per renderer: :mod:`.table`, :mod:`.markdown`, :mod:`.html`, and :mod:`.plots` (matplotlib, the
optional ``plots`` extra; without it HTML and Markdown say how to install it and still show every table).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from axcnn.errors import AxcnnError, MissingBackendError
from axcnn.render.common import PLOTS_MISSING

log = logging.getLogger(__name__)

FORMATS = ("table", "markdown", "html", "json")
KNOWN_SCHEMA = 2  # the newest report schema these renderers know every field of


def check(report, source: str = "the report") -> dict:
    """Return ``report`` if it looks like an axcnn report; raise AxcnnError naming what is missing."""
    if not isinstance(report, dict):
        raise AxcnnError(f"{source} is not an axcnn report (a JSON {type(report).__name__}, not an object)")
    version = report.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise AxcnnError(f"{source} is not an axcnn report (no integer schema_version)")
    tool = report.get("tool")
    if isinstance(tool, dict) and tool.get("name") not in (None, "axcnn"):
        raise AxcnnError(f"{source} is not an axcnn report (written by {tool.get('name')!r})")
    layers = report.get("layers")
    if not isinstance(layers, list) or not all(isinstance(x, dict) and "name" in x for x in layers):
        raise AxcnnError(f"{source} is not an axcnn report (no list of layer records)")
    if version > KNOWN_SCHEMA:
        log.warning("%s has report schema %d; this axcnn knows up to %d, so newer fields are not shown",
                    source, version, KNOWN_SCHEMA)
    return report


def load(path: str | os.PathLike) -> dict:
    """Read a report JSON file and :func:`check` it. Every failure is an AxcnnError with a one-line message."""
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except FileNotFoundError:
        raise AxcnnError(f"report file not found: {path}") from None
    except IsADirectoryError:
        raise AxcnnError(f"{path} is a folder, not a report file") from None
    except OSError as exc:
        raise AxcnnError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AxcnnError(f"{path} is not an axcnn report (not JSON: {str(exc).splitlines()[0]})") from None
    return check(report, str(path))


def default_path(report_path: str | os.PathLike, fmt: str) -> Path:
    """Where ``fmt`` goes when no output is given: ``X.report.json`` -> ``X.report.html`` in the same folder."""
    p = Path(report_path)
    stem = p.name[:-5] if p.name.lower().endswith(".json") else p.name
    return p.with_name(stem + {"html": ".html", "markdown": ".md", "table": ".txt", "json": ".json"}[fmt])


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} is invalid; allowed: {', '.join(FORMATS)}")


def _plots_or_note(report: dict):
    from axcnn.render import plots

    try:
        return plots.plots(report), None
    except MissingBackendError:
        return [], PLOTS_MISSING


def render(report: dict, fmt: str) -> str:
    """The report as text in ``fmt``. Markdown links no plots (it has nowhere to put them); HTML embeds them."""
    _check_format(fmt)
    check(report)
    if fmt == "json":
        return json.dumps(report, indent=2) + "\n"
    if fmt == "table":
        from axcnn.render.table import render_table

        return render_table(report) + "\n"
    if fmt == "markdown":
        from axcnn.render.markdown import render_markdown

        return render_markdown(report)
    from axcnn.render.html import render_html

    figures, note = _plots_or_note(report)
    return render_html(report, figures, note)


def plots_dir(path: str | os.PathLike) -> Path:
    """The folder beside a Markdown file that holds its PNGs: ``report.md`` -> ``report_plots/``."""
    p = Path(path)
    return p.with_name(p.stem + "_plots")


def write(report: dict, fmt: str, path: str | os.PathLike) -> list[Path]:
    """Write the report in ``fmt`` to ``path`` and return every file written, the main one first.

    Each file is written to a temporary file in its folder, fsynced, then renamed over the target, so a failure
    leaves no half-written file; Markdown's PNGs are removed again when the Markdown itself cannot be written.
    """
    _check_format(fmt)
    check(report)
    path = Path(path)
    _check_target(path)
    if fmt != "markdown":
        _atomic_write(path, render(report, fmt).encode("utf-8"))
        return [path]
    from axcnn.render.markdown import render_markdown

    figures, note = _plots_or_note(report)
    folder = plots_dir(path)
    written: list[Path] = []
    created = not folder.exists()
    try:
        if figures:
            try:
                folder.mkdir(exist_ok=True)
            except OSError as exc:
                raise AxcnnError(f"cannot create {folder}: {exc.strerror or exc}") from None
            for fig in figures:
                _atomic_write(folder / f"{fig.name}.png", fig.png)
                written.append(folder / f"{fig.name}.png")
        images = [(f.title, f.caption, f"{folder.name}/{f.name}.png") for f in figures]
        _atomic_write(path, render_markdown(report, images, note).encode("utf-8"))
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        if created and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
        raise
    from axcnn.render.plots import NAMES

    for name in set(NAMES) - {f.name for f in figures}:  # a plot an earlier render of this file had, now stale
        (folder / f"{name}.png").unlink(missing_ok=True)
    if not figures and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    return [path, *written]


def _check_target(path: Path) -> None:
    if path.is_dir():
        raise AxcnnError(f"cannot write {path}: it is a folder")
    if not path.parent.resolve().is_dir():
        raise AxcnnError(f"cannot write {path}: folder {path.parent} does not exist")


def _atomic_write(path: Path, data: bytes) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.resolve().parent)
    except OSError as exc:
        raise AxcnnError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; a report is for sharing
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise AxcnnError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
