"""CLI: exit codes, one-line errors, nothing written on bad input."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import tiny_cnn
from onnx import numpy_helper

from axcnn import __version__
from axcnn.cli import main

FAST = ["--kmin", "2", "--kmax", "8", "--filter", "0.34", "--min-weights", "16", "-q"]


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_version_and_help_with_examples():
    r = _run(["--version"])
    assert r.exit_code == 0 and __version__ in r.output
    r = _run(["compress", "--help"])
    assert r.exit_code == 0 and "Examples:" in r.output and "--filter" in r.output


def test_compress_writes_model_and_report(tiny_files, tmp_path):
    mp, dp = tiny_files
    out, rep = tmp_path / "o.onnx", tmp_path / "o.json"
    r = _run(["compress", str(mp), "--data", str(dp), "-o", str(out), "--report", str(rep), *FAST[:-1]])
    assert r.exit_code == 0, r.output
    assert "compression ratio (Eq. 1)" in r.output and "wrote" in r.output
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    report = json.loads(rep.read_text())
    assert report["schema_version"] == 2 and len(report["layers"]) == 3
    r = _run(["report", str(rep), "--format", "markdown"])
    assert r.exit_code == 0 and r.output.startswith("# axcnn report")


def test_default_report_path_sits_beside_output(tiny_files, tmp_path):
    mp, dp = tiny_files
    out = tmp_path / "model.shared.onnx"
    r = _run(["compress", str(mp), "--data", str(dp), "-o", str(out), *FAST])
    assert r.exit_code == 0 and r.output == ""  # -q: nothing on stdout
    assert (tmp_path / "model.shared.report.json").is_file()


def test_plain_scoring_flag_gives_the_same_result(tiny_files, tmp_path):
    """--plain-scoring turns off suffix scoring and early stopping (recorded in the report's settings); the
    chosen K, the scores and the written weights are the same as with the default fast scoring."""
    mp, dp = tiny_files
    reports, weights = {}, {}
    for tag, extra in (("fast", []), ("plain", ["--plain-scoring"])):
        out, rep = tmp_path / f"{tag}.onnx", tmp_path / f"{tag}.json"
        r = _run(["compress", str(mp), "--data", str(dp), "-o", str(out), "--report", str(rep), *FAST, *extra])
        assert r.exit_code == 0, r.output
        reports[tag] = json.loads(rep.read_text())
        weights[tag] = {t.name: t.SerializeToString() for t in onnx.load(str(out)).graph.initializer}
    fast, plain = reports["fast"], reports["plain"]
    assert (fast["settings"]["fast_scoring"], fast["settings"]["early_stop"]) == (True, True)
    assert (plain["settings"]["fast_scoring"], plain["settings"]["early_stop"]) == (False, False)
    assert [(x["name"], x["k"], x["score"]) for x in fast["layers"]] == \
        [(x["name"], x["k"], x["score"]) for x in plain["layers"]]
    assert fast["final_score"] == plain["final_score"] and weights["fast"] == weights["plain"]
    assert all(not c["stopped_early"] for x in plain["layers"] for c in x["candidates"])


def _bad_model_nan(tmp_path):
    m = tiny_cnn()
    w = numpy_helper.to_array(m.graph.initializer[3]).copy()
    w[0, 0] = np.nan
    m.graph.initializer[3].CopyFrom(numpy_helper.from_array(w, "w3"))
    p = tmp_path / "nan.onnx"
    onnx.save(m, p)
    return p


@pytest.mark.parametrize(
    "case,fragment",
    [
        ("missing_model", "model file not found"),
        ("corrupt_model", "not a readable ONNX model"),
        ("nan_weights", "NaN or infinity"),
        ("shape_mismatch", "does not match model input"),
        ("labels_out_of_range", "labels must lie in [0, 9]"),
        ("kmin_above_kmax", "kmin=9 is invalid"),
        ("kmin_below_1", "kmin=0 is invalid"),
        ("filter_zero", "filter=0.0 is invalid"),
        ("filter_above_1", "filter=1.5 is invalid"),
        ("output_is_input", "is the input model"),
        ("missing_data", "not found"),
        ("bad_mean", "--mean"),
    ],
)
def test_bad_input_one_line_error_exit_1_nothing_written(case, fragment, tiny_files, tmp_path):
    mp, dp = tiny_files
    out = tmp_path / "out.onnx"
    args = ["compress", str(mp), "--data", str(dp), "-o", str(out), *FAST]
    if case == "missing_model":
        args[1] = str(tmp_path / "nope.onnx")
    elif case == "corrupt_model":
        bad = tmp_path / "corrupt.onnx"
        bad.write_bytes(mp.read_bytes()[: len(mp.read_bytes()) // 3])
        args[1] = str(bad)
    elif case == "nan_weights":
        args[1] = str(_bad_model_nan(tmp_path))
    elif case == "shape_mismatch":
        np.savez(dp, x=np.zeros((10, 1, 7, 7), np.float32), y=np.zeros(10, np.int64))
    elif case == "labels_out_of_range":
        d = np.load(dp)
        np.savez(dp, x=d["x"], y=np.full(len(d["y"]), 12, np.int64))
    elif case == "kmin_above_kmax":
        args += ["--kmin", "9", "--kmax", "3"]
    elif case == "kmin_below_1":
        args += ["--kmin", "0"]
    elif case == "filter_zero":
        args += ["--filter", "0"]
    elif case == "filter_above_1":
        args += ["--filter", "1.5"]
    elif case == "output_is_input":
        args[5] = str(mp)
        out = None
    elif case == "missing_data":
        args[3] = str(tmp_path / "nope.npz")
    elif case == "bad_mean":
        args += ["--scale", "1", "--mean", "0.1,0.2"]
    before = mp.read_bytes()
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], r.output
    assert "Traceback" not in r.output
    if out is not None:
        assert not out.exists()
    assert mp.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in tmp_path.iterdir() if not p.name.startswith(".")), "temporary files left behind"


def test_usage_errors_exit_2(tiny_files):
    mp, dp = tiny_files
    assert CliRunner().invoke(main, ["compress"]).exit_code == 2  # MODEL missing
    assert CliRunner().invoke(main, ["compress", str(mp), "--data", str(dp), "--bogus"]).exit_code == 2
    assert CliRunner().invoke(main, ["compress", str(mp), "--data", str(dp), "--kmin", "x"]).exit_code == 2


def test_report_on_a_non_report_fails_cleanly(tmp_path):
    p = tmp_path / "r.json"
    p.write_text("{not json")
    r = CliRunner().invoke(main, ["report", str(p)])
    assert r.exit_code == 1 and r.output.startswith("error: ")


def test_ctrl_c_keeps_the_journal_and_prints_the_command_that_resumes(tiny_files, tmp_path, monkeypatch):
    import shlex

    from axcnn import cli

    mp, dp = tiny_files
    whole = tmp_path / "whole.onnx"
    assert _run(["compress", str(mp), "--data", str(dp), "-o", str(whole), *FAST]).exit_code == 0
    out, run_dir = tmp_path / "o.onnx", tmp_path / "my run"
    seen = {"n": 0}

    def ctrl_c(self, event, **info):
        if event == "candidate":
            seen["n"] += 1
            if seen["n"] == 4:
                raise KeyboardInterrupt

    monkeypatch.setattr(cli._Progress, "__call__", ctrl_c)
    r = _run(["compress", str(mp), "--data", str(dp), "-o", str(out), "--run-dir", str(run_dir), *FAST[:-1]])
    assert r.exit_code == 130 and "Traceback" not in r.output
    assert f"the work done so far is kept in {run_dir}" in r.stderr and not out.exists()
    command = shlex.split(r.stderr.strip().splitlines()[-1])
    assert command[:3] == ["axcnn", "compress", str(mp)] and command[-1] == "--resume"
    assert command[command.index("--run-dir") + 1] == str(run_dir) and "--kmax" in command
    r = _run([*command[1:], "-q"])
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == whole.read_bytes()
    rep = json.loads((tmp_path / "o.report.json").read_text())
    assert rep["timing"]["candidates_resumed"] == 4


def test_unfinished_run_is_not_overwritten_without_resume(tiny_files, tmp_path, monkeypatch):
    from axcnn import cli

    mp, dp = tiny_files
    out = tmp_path / "o.onnx"

    def ctrl_c(self, event, **info):
        if event == "candidate":
            raise KeyboardInterrupt

    monkeypatch.setattr(cli._Progress, "__call__", ctrl_c)
    assert _run(["compress", str(mp), "--data", str(dp), "-o", str(out), *FAST[:-1]]).exit_code == 130
    monkeypatch.undo()
    r = _run(["compress", str(mp), "--data", str(dp), "-o", str(out), *FAST])
    assert r.exit_code == 1 and "unfinished run" in r.stderr and "--resume" in r.stderr
    r = _run(["compress", str(mp), "--data", str(dp), "-o", str(out), *FAST, "--kmax", "7", "--resume"])
    assert r.exit_code == 1 and "other settings (kmax 8 -> 7)" in r.stderr and r.stderr.count("\n") == 1


@pytest.fixture
def report_file(tmp_path):
    """A real first-round report (tiny model) written as compress writes it."""
    from test_render import first_round_report

    from axcnn.report import write_json

    p = tmp_path / "m.shared.report.json"
    write_json(first_round_report(), p)
    return p


@pytest.mark.parametrize("fmt,start", [("table", "layer "), ("markdown", "# axcnn report: tiny.onnx"),
                                       ("json", "{\n  \"schema_version\": 1")])
def test_report_prints_table_markdown_json_to_stdout(report_file, fmt, start):
    before = sorted(report_file.parent.iterdir())
    r = _run(["report", str(report_file), "--format", fmt])
    assert r.exit_code == 0 and r.output.startswith(start), r.output
    assert "w1" in r.output and sorted(report_file.parent.iterdir()) == before
    if fmt == "json":
        assert json.loads(r.output) == json.loads(report_file.read_text())


def test_report_default_format_is_the_compress_table(report_file):
    from axcnn.render.table import render_table

    r = _run(["report", str(report_file)])
    assert r.exit_code == 0 and r.output == render_table(json.loads(report_file.read_text())) + "\n"


def test_report_html_without_output_goes_beside_the_json(report_file):
    r = _run(["report", str(report_file), "--format", "html"])
    target = report_file.with_name("m.shared.report.html")
    assert r.exit_code == 0 and r.output == f"wrote {target}\n"
    assert target.read_text().startswith("<!DOCTYPE html>")


@pytest.mark.parametrize("fmt", ["table", "markdown", "html", "json"])
def test_report_output_file_for_every_format(report_file, tmp_path, fmt):
    out = tmp_path / "out" / f"r.{fmt}"
    out.parent.mkdir()
    r = _run(["report", str(report_file), "--format", fmt, "-o", str(out)])
    assert r.exit_code == 0 and r.output.startswith(f"wrote {out}"), r.output
    text = out.read_text()
    assert "w1" in text
    names = sorted(p.name for p in out.parent.rglob("*"))
    if fmt == "markdown":
        assert names == ["candidates.png", "layers.png", "r.markdown", "r_plots"]
        for line in text.splitlines():
            if line.startswith("!["):
                assert (out.parent / line.split("](")[1].rstrip(")")).read_bytes().startswith(b"\x89PNG")
    else:
        assert names == [out.name]


def _bad_report(case, tmp_path, report_file):
    """(args, fragment) for one bad invocation."""
    args = ["report", str(report_file), "--format", "html", "-o", str(tmp_path / "r.html")]
    if case == "missing":
        args[1] = str(tmp_path / "nope.json")
        return args, "report file not found"
    if case == "folder":
        args[1] = str(tmp_path)
        return args, "is a folder"
    if case == "not_json":
        (tmp_path / "bad.json").write_text("{not json")
        args[1] = str(tmp_path / "bad.json")
        return args, "not JSON"
    if case == "not_a_report":
        (tmp_path / "other.json").write_text('{"name": "something else"}')
        args[1] = str(tmp_path / "other.json")
        return args, "is not an axcnn report"
    if case == "output_folder_missing":
        args[-1] = str(tmp_path / "no" / "r.html")
        return args, "does not exist"
    if case == "output_is_a_folder":
        (tmp_path / "d").mkdir()
        args[-1] = str(tmp_path / "d")
        return args, "it is a folder"
    if case == "output_is_the_report":
        args[-1] = str(report_file)
        return args, "is the report being rendered"
    if case == "malformed_field":
        rep = json.loads(report_file.read_text())
        rep["skipped"] = ["b1"]  # names where records belong
        (tmp_path / "odd.json").write_text(json.dumps(rep))
        args[1] = str(tmp_path / "odd.json")
        return args, "is not a valid axcnn report (AttributeError"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "folder", "not_json", "not_a_report", "output_folder_missing",
                                  "output_is_a_folder", "output_is_the_report", "malformed_field"])
def test_report_bad_input_one_line_exit_1_nothing_written(case, tmp_path, report_file):
    args, fragment = _bad_report(case, tmp_path, report_file)
    report_before = report_file.read_bytes()
    before = sorted(tmp_path.rglob("*"))
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], r.output
    assert "Traceback" not in r.output
    assert sorted(tmp_path.rglob("*")) == before and report_file.read_bytes() == report_before


@pytest.mark.parametrize("flags", [["--granularity", "channel", "--group-size", "3"], ["--granularity", "kernel"],
                                   ["--vector-dim", "2"]])
def test_compress_granularity_flags(flags, tiny_files, tmp_path):
    mp, dp = tiny_files
    out, rep = tmp_path / "o.onnx", tmp_path / "o.json"
    r = _run(["compress", str(mp), "--data", str(dp), "-o", str(out), "--report", str(rep), *FAST, *flags])
    assert r.exit_code == 0, r.output
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    report = json.loads(rep.read_text())
    granularity = flags[1] if flags[0] == "--granularity" else "layer"
    assert report["settings"]["granularity"] == granularity
    assert {layer["granularity"] for layer in report["layers"] if layer["op_type"] == "Conv"} == {granularity}
    r = _run(["inspect", str(out)])
    assert r.exit_code == 0 and ("vector2" if "--vector-dim" in flags else granularity) in r.output


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--granularity", "channel", "--vector-dim", "2"], "vector_dim=2 is invalid with granularity='channel'"),
    (["--group-size", "4"], "group_size=4 is invalid with granularity='layer'"),
    (["--vector-dim", "3"], "vector_dim=3 is invalid: allowed 1 or 2"),
])
def test_contradictory_granularity_flags_one_line_exit_1(flags, fragment, tiny_files, tmp_path):
    mp, dp = tiny_files
    out = tmp_path / "o.onnx"
    r = CliRunner().invoke(main, ["compress", str(mp), "--data", str(dp), "-o", str(out), *FAST, *flags])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and fragment in lines[0], r.output
    assert not out.exists()


def test_granularity_choice_is_checked_by_the_cli(tiny_files):
    mp, dp = tiny_files
    r = CliRunner().invoke(main, ["compress", str(mp), "--data", str(dp), "--granularity", "row"])
    assert r.exit_code == 2 and "row" in r.output
