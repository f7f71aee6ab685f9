"""Command-line interface. The only module that imports click; it parses, shows progress and maps errors to exit codes.

Exit codes: 0 success, 1 a user error (AxcnnError or an invalid option value), 2 a usage error (click),
3 an internal error (a bug: the traceback shows with -vv), 130 interrupted.
"""

from __future__ import annotations

import logging
import sys

import click

from axcnn import __version__
from axcnn.errors import AxcnnError

log = logging.getLogger("axcnn")

COMPRESS_EXAMPLES = """
\b
Examples:
  axcnn compress model.onnx --data test.npz --kmin 40 --kmax 80 --filter 0.15
  axcnn compress model.onnx --data images/ --preset imagenet   # class subfolders of PNG/JPEG
  axcnn compress model.onnx                  # test_data_set_* beside the model, else data-free
  axcnn compress resnet20.onnx --data cifar10.npz --scale 255 \\
      --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --limit 1000 -o resnet20.shared.onnx
  axcnn compress model.onnx --data test.npz --filter 1          # Algorithm 1: score every K
  axcnn compress model.onnx --data test.npz --estimator kl      # rank candidates by output KL
  axcnn compress model.onnx --data test.npz --resume            # continue a run that was stopped
"""


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING
    if quiet:
        level = logging.ERROR
    elif verbose == 1:
        level = logging.INFO
    elif verbose >= 2:
        level = logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("axcnn: %(message)s"))
    root = logging.getLogger("axcnn")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


class _Progress:
    """tqdm bars over layers and over each layer's scored candidates."""

    def __init__(self, enabled: bool, layers: int | None = None):
        self.enabled = enabled
        self.layers = None
        self.cands = None

    def __call__(self, event: str, **info) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if event == "layer":
            if self.layers is None:
                self.layers = tqdm(total=info["total"], desc="layers", unit="layer", position=0, leave=True)
            if self.cands is not None:
                self.cands.close()
                self.layers.update(1)
            self.cands = tqdm(total=info["candidates"], desc=f"  {info['name'][-30:]}", unit="cand",
                              position=1, leave=False)
        elif event == "candidate" and self.cands is not None:
            self.cands.update(1)

    def close(self) -> None:
        if self.cands is not None:
            self.cands.close()
            self.layers.update(1)
        if self.layers is not None:
            self.layers.close()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="axcnn")
def main() -> None:
    """axcnn: post-training weight sharing for ONNX models (no retraining).

    Each weight of a Conv/Gemm/MatMul layer is replaced by its k-means centroid; the file stores K centroids and
    a ceil(log2 K)-bit index per weight, and stock onnxruntime runs it.
    """


def _floats(ctx, param, value):
    if value is None:
        return None
    from axcnn.data import parse_floats

    try:
        return parse_floats(value)
    except AxcnnError as exc:
        raise click.BadParameter(str(exc)) from exc


def _click_type(kind: str, choices: tuple[str, ...]):
    return {"int": int, "float": float, "str": str, "bool": bool, "floats": str,
            "path": click.Path(dir_okay=False)}.get(kind) or click.Choice(list(choices))


def options_from(*classes):
    """click options for every CLI option field of the given option dataclasses (see axcnn.options), in
    declaration order. Every option defaults to None, so only what the user set is passed on."""
    from axcnn.options import cli_flag, option_fields

    def decorate(f):
        for cls in reversed(classes):
            for fld, o in reversed(option_fields(cls)):
                if not o.cli:
                    continue
                default = o.default_text if o.default_text is not None else (
                    None if fld.default is None else str(fld.default))
                help_text = o.help + (f" [default: {default}]" if default not in (None, "False") else "")
                if o.kind == "bool":
                    f = click.option(cli_flag(fld, o), fld.name, is_flag=True, default=None, help=help_text)(f)
                else:
                    f = click.option(cli_flag(fld, o), fld.name, type=_click_type(o.kind, o.choices),
                                     callback=_floats if o.kind == "floats" else None, metavar=o.metavar,
                                     default=None, help=help_text)(f)
        return f

    return decorate


def _split(values: dict, cls) -> dict:
    """The user-set values (not None) that belong to option dataclass ``cls``."""
    from axcnn.options import option_fields

    names = {f.name for f, _ in option_fields(cls)}
    return {k: v for k, v in values.items() if k in names and v is not None}


def _option_args(values: dict) -> list[str]:
    """The command-line flags that set ``values`` (option field -> value; None: not set)."""
    from axcnn.options import cli_flag, option_fields

    args: list[str] = []
    for cls in _config_classes():
        for fld, o in option_fields(cls):
            value = values.get(fld.name)
            if value is None or not o.cli:
                continue
            if o.kind == "bool":
                args += [cli_flag(fld, o)] if value else []
            elif o.kind == "floats":
                args += [cli_flag(fld, o), ",".join(str(v) for v in value)]
            else:
                args += [cli_flag(fld, o), str(value)]
    return args


def _interrupted(run_dir, command: list[str]) -> None:
    """Ctrl-C: say where the work done so far is kept and the exact command that continues it; exit 130."""
    import shlex

    from axcnn.journal import FILE_NAME

    if (run_dir / FILE_NAME).is_file():
        click.echo(f"interrupted; the work done so far is kept in {run_dir}. Resume with:", err=True)
    else:
        click.echo("interrupted before any work was recorded; nothing was written. Start again with:", err=True)
    click.echo("  " + shlex.join(command), err=True)
    sys.exit(130)


def _config_classes():
    from axcnn.config import CompressConfig
    from axcnn.data import Preprocess

    return CompressConfig, Preprocess


@main.command(epilog=COMPRESS_EXAMPLES)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", "data", type=click.Path(), metavar="PATH",
              help="Test data: an .npz (x, and y labels if any), a folder of images (one subfolder per class, or "
              "flat and unlabelled), or an ONNX-zoo folder (test_data_set_N/input_0.pb, output_0.pb). Unlabelled "
              "data is scored by agreement with the original model. [default: the test_data_set_* folders beside "
              "MODEL; with none, a data-free run on synthetic inputs, which does not measure accuracy]")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Weight-shared model to write "
              "[default: MODEL-STEM.shared.onnx in the current folder].")
@click.option("--report", "report_path", type=click.Path(dir_okay=False),
              help="Write the JSON report here [default: OUTPUT with .report.json].")
@options_from(*_config_classes())
@click.option("--plain-scoring", is_flag=True, default=None,
              help="Score every chosen candidate on the full network over every sample (slow; the same result).")
@click.option("--output-name", help="Model output to score [default: the first].")
@click.option("--run-dir", type=click.Path(file_okay=False), help="Folder of the run's journal: every scored "
              "candidate and fixed layer, for --resume [default: OUTPUT-STEM.run beside the output].")
@click.option("--resume", is_flag=True, help="Continue the run stopped in --run-dir: what it scored is not scored "
              "again, and the output is the same. Without a journal there, start a new run.")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or summary; errors only.")
def compress(model, data, output, report_path, plain_scoring, output_name, run_dir, resume, verbose, quiet,
             **options):
    """Weight-share MODEL, scoring candidates on the test data --data (or data-free without it)."""
    _setup_logging(verbose, quiet)
    from pathlib import Path

    if plain_scoring:
        options.update(fast_scoring=False, early_stop=False)
    config_cls, pre_cls = _config_classes()
    progress = _Progress(enabled=not quiet)
    from axcnn.api import default_output, default_run_dir

    out = Path(output) if output else default_output(model)
    rep_path = Path(report_path) if report_path else out.with_name(out.name.removesuffix(".onnx") + ".report.json")
    run_dir = Path(run_dir) if run_dir else default_run_dir(out)
    try:
        from axcnn.api import compress as run

        config = config_cls(**_split(options, config_cls))
        preprocess = pre_cls(**_split(options, pre_cls))
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm(loggers=[log]):  # log lines go above the bars, not through them
            result = run(model, data, out, rep_path, config, preprocess, output_name, progress, run_dir=run_dir,
                         resume=resume)
    except (AxcnnError, ValueError) as exc:
        progress.close()
        _fail(str(exc))
    except KeyboardInterrupt:
        progress.close()
        again = ["axcnn", "compress", model, "--data", data, "-o", str(out), "--report", str(rep_path),
                 *_option_args(options), *(["--plain-scoring"] if plain_scoring else []),
                 *(["--output-name", output_name] if output_name else []), "--run-dir", str(run_dir), "--resume",
                 *(["-q"] if quiet else [])]
        _interrupted(run_dir, again)
    except Exception as exc:  # a bug, not a user error: one line, the traceback only with -vv
        progress.close()
        log.debug("internal error", exc_info=True)
        click.echo(f"internal error: {type(exc).__name__}: {exc} (rerun with -vv for the traceback)", err=True)
        sys.exit(3)
    progress.close()
    if not quiet:
        from axcnn.render.table import render_table

        click.echo(render_table(result.report))
        click.echo(f"wrote {result.output_path} and {result.report_path}")


BATCH_EXAMPLES = """
\b
Example batch.toml (keys are the compress options, plus path, data, output, report, output_name, run_dir and the
gates min_cr and max_loss; relative paths are relative to the file's folder):
  [defaults]
  kmin = 8
  kmax = 32
  limit = 1000
  [[model]]
  path = "models/a.onnx"
  data = "data/a.npz"
  scale = 255.0
  min_cr = 4.0
  output = "out/a.onnx"

\b
  axcnn batch batch.toml --summary out/summary.json --junit out/junit.xml
"""

STATUS_WORDS = {"passed": "PASS", "failed": "FAIL", "error": "ERROR", "skipped": "SKIP"}


def _status_line(o, total: int) -> str:
    head = f"[{o.job.index}/{total}] {STATUS_WORDS[o.status]:<5} {o.job.name}"
    rep = o.report
    if rep is not None:
        from axcnn.batch import measured_loss

        t = rep["timing"]
        resumed = f", {t['candidates_resumed']} resumed" if t.get("candidates_resumed") else ""
        head += (f"  CR {rep['compression_ratio']:.2f}x  loss {measured_loss(rep):.2f} pp  "
                 f"({t['candidates_scored']} candidates scored{resumed}, {o.time_s:.1f} s)")
    return head + (f"\n      {o.message}" if o.message else "")


@main.command("batch", epilog=BATCH_EXAMPLES)
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--summary", "summary_path", type=click.Path(dir_okay=False), help="Write a JSON summary here.")
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False),
              help="Write JUnit XML here: one testcase per model, a broken gate a failure, a crash an error.")
@click.option("--fail-fast", is_flag=True, help="Stop at the first model that fails or errs; skip the rest.")
@click.option("--resume", is_flag=True, help="Continue each model's stopped run from the journal in its run_dir; "
              "models already done are taken from their journal without scoring.")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars; only each model's status.")
def batch_cmd(config, summary_path, junit_path, fail_fast, resume, verbose, quiet):
    """Compress every model of the TOML file CONFIG and check its gates (exit 1 if any model fails)."""
    _setup_logging(verbose, quiet)
    from pathlib import Path

    from axcnn import batch

    summary_file = Path(summary_path) if summary_path else None
    junit_file = Path(junit_path) if junit_path else None
    try:
        plan = batch.load_plan(config)
        for path, what in ((summary_file, "summary"), (junit_file, "JUnit")):
            if path is not None:
                batch.check_result_path(path, what, plan)
    except AxcnnError as exc:
        _fail(str(exc))
    outcomes = []
    bars: list[_Progress] = []

    def progress(job):
        bars.append(_Progress(enabled=not quiet))
        return bars[-1]

    def on_done(outcome):
        if bars:
            bars.pop().close()
        outcomes.append(outcome)
        click.echo(_status_line(outcome, len(plan.jobs)))

    def write_results():
        try:
            batch.write_results(plan, outcomes, summary_file, junit_file)
        except OSError as exc:  # making a folder
            _fail(f"cannot write {exc.filename or 'the results'}: {exc.strerror or exc}")
        except AxcnnError as exc:
            _fail(str(exc))

    try:
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm(loggers=[log]):
            batch.run_plan(plan, resume=resume, fail_fast=fail_fast, progress=progress, on_done=on_done)
    except KeyboardInterrupt:
        for bar in bars:
            bar.close()
        write_results()
        import shlex

        again = ["axcnn", "batch", config, "--resume",
                 *(["--summary", summary_path] if summary_path else []),
                 *(["--junit", junit_path] if junit_path else []), *(["--fail-fast"] if fail_fast else []),
                 *(["-q"] if quiet else [])]
        click.echo(f"interrupted after {len(outcomes)} of {len(plan.jobs)} models; each model's journal keeps its "
                   "work. Resume with:", err=True)
        click.echo("  " + shlex.join(again), err=True)
        sys.exit(130)
    write_results()
    c = batch.counts(outcomes)
    click.echo(f"{len(plan.jobs)} models: {c['passed']} passed, {c['failed']} failed, {c['error']} errors"
               + (f", {c['skipped']} skipped" if c["skipped"] else ""))
    written = [str(p) for p in (summary_file, junit_file) if p is not None]
    if written:
        click.echo("wrote " + " and ".join(written))
    sys.exit(0 if c["passed"] == len(plan.jobs) else 1)


@main.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
def inspect_cmd(model, as_json):
    """List every weight tensor of MODEL; for an axcnn model also each layer's K, bits, stored bytes and CR."""
    import json

    try:
        from axcnn.inspect import describe, render
        from axcnn.model import load_model

        info = describe(load_model(model))
    except AxcnnError as exc:
        _fail(str(exc))
    click.echo(json.dumps(info, indent=2) if as_json else render(info))


@main.command("expand")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Dense model to write.")
def expand_cmd(model, output):
    """Write a plain dense copy of an axcnn MODEL, with no decode ops, for runtimes that lack one."""
    from pathlib import Path

    try:
        from axcnn import rewrite
        from axcnn.api import check_output_path
        from axcnn.model import load_model

        check_output_path(Path(model), Path(output), "output")
        m = load_model(model)
        if not rewrite.is_shared_model(m):
            raise AxcnnError(f"{model} is not an axcnn weight-shared model; nothing to expand")
        dense = rewrite.expand(m)
        size = rewrite.write_model(dense, output, external_data=dense.ByteSize() > (2 << 30) - (1 << 20))
    except AxcnnError as exc:
        _fail(str(exc))
    click.echo(f"wrote {output} ({size:,} bytes)")


REPORT_EXAMPLES = """
\b
Examples:
  axcnn report model.shared.report.json                      # the terminal table
  axcnn report model.shared.report.json --format html        # writes model.shared.report.html beside it
  axcnn report model.shared.report.json --format markdown -o report.md   # PNGs go to report_plots/
"""


@main.command("report", epilog=REPORT_EXAMPLES)
@click.argument("report_json", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "html", "json"]), default="table",
              show_default=True, help="html is one self-contained page with the plots embedded.")
@click.option("-o", "--output", type=click.Path(), help="Write here instead of stdout [html default: REPORT_JSON "
              "with .html]. Markdown also writes its plots (PNG) to a folder OUTPUT-STEM_plots/ beside it.")
def report_cmd(report_json, fmt, output):
    """Render a JSON report written by compress. The plots need matplotlib: pip install 'axcnn[plots]'."""
    _setup_logging(0, False)  # warnings (a newer schema, a plot left out) print as "axcnn: ..." on stderr
    import os
    from pathlib import Path

    from axcnn import render

    written = []
    try:
        rep = render.load(report_json)
        if output is None and fmt == "html":
            output = render.default_path(report_json, fmt)
        if output is None:
            click.echo(render.render(rep, fmt), nl=False)
            return
        if Path(output).exists() and os.path.samefile(output, report_json):
            raise AxcnnError(f"-o {output} is the report being rendered; choose another file")
        written = render.write(rep, fmt, output)
    except AxcnnError as exc:
        _fail(str(exc))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a malformed field deep in the dict
        log.debug("render failure", exc_info=True)
        _fail(f"{report_json} is not a valid axcnn report ({type(exc).__name__}: {exc})")
    click.echo(f"wrote {', '.join(map(str, written))}")


if __name__ == "__main__":  # pragma: no cover
    main()
