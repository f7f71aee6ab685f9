"""axcnn batch: the TOML file is checked whole before any work, keys come from the one table of options, gates
decide pass/fail, and the summary and JUnit XML say so."""

from __future__ import annotations

import json
import shlex
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import realdata_manifest, tiny_cnn, tiny_data

from axcnn import batch, cli
from axcnn.batch import Gate, Job, gates_of, load_plan
from axcnn.config import CompressConfig
from axcnn.data import Preprocess
from axcnn.errors import AxcnnError, BudgetNotMet
from axcnn.options import option_fields

FAST = 'kmin = 2\nkmax = 8\nfilter = 0.34\nmin_weights = 16\n'


@pytest.fixture
def project(tmp_path):
    """Two tiny models and their data under tmp_path/proj (a batch file's folder)."""
    root = tmp_path / "proj"
    (root / "models").mkdir(parents=True)
    (root / "data").mkdir()
    for s in (0, 1):
        model = tiny_cnn(seed=s)
        x, y = tiny_data(model, n=100, seed=s)
        onnx.save(model, root / "models" / f"m{s}.onnx")
        np.savez(root / "data" / f"d{s}.npz", x=x, y=y)
    return root


def _write(root, text):
    path = root / "batch.toml"
    path.write_text(text)
    return path


def _model(i, extra=""):
    return f'[[model]]\npath = "models/m{i}.onnx"\ndata = "data/d{i}.npz"\noutput = "out/m{i}.onnx"\n{extra}\n'


def _run(args):
    return CliRunner().invoke(cli.main, args, catch_exceptions=False)


# -- the file ------------------------------------------------------------------------------------------------

def test_plan_resolves_paths_against_the_file_and_merges_defaults(project, monkeypatch, tmp_path):
    path = _write(project, f"[defaults]\n{FAST}scale = 16\nmean = [0.5]\nmin_cr = 2\n"
                  + _model(0, "kmax = 6\nlayout = 'nchw'") + _model(1, "min_cr = 3.5\nrun_dir = 'runs/one'"))
    monkeypatch.chdir(tmp_path)  # not the file's folder
    plan = load_plan(path)
    a, b = plan.jobs
    assert a.path == project / "models" / "m0.onnx" and a.data == project / "data" / "d0.npz"
    assert a.output == project / "out" / "m0.onnx" and a.report == project / "out" / "m0.report.json"
    assert a.run_dir == project / "out" / "m0.run" and b.run_dir == project / "runs" / "one"
    assert (a.config.kmin, a.config.kmax, b.config.kmax, a.config.filter) == (2, 6, 8, 0.34)
    assert a.preprocess == Preprocess(scale=16.0, mean=(0.5,), layout="NCHW") and a.min_cr == 2 and b.min_cr == 3.5
    assert a.name == "models/m0.onnx" and a.index == 1


def test_output_defaults_to_the_file_folder(project):
    plan = load_plan(_write(project, '[[model]]\npath = "models/m0.onnx"\ndata = "data/d0.npz"\n'))
    assert plan.jobs[0].output == project / "m0.shared.onnx"


def _sample(name, o):
    """A valid value of option ``name``: its resolved default, else one of its kind."""
    for cls in (CompressConfig, Preprocess):
        value = getattr(cls(), name, None)
        if value is not None and not isinstance(value, bool):
            return list(value) if isinstance(value, tuple) else value
    if name == "pick":  # a string with a form of its own
        return "loss:1"
    return {"int": 1, "float": 1.5, "bool": True, "str": "x", "path": "x", "floats": [0.5],
            "choice": o.choices[-1] if o.choices else None}[o.kind]


@pytest.mark.parametrize("field_opt", [fo for cls in (CompressConfig, Preprocess) for fo in option_fields(cls)],
                         ids=lambda fo: fo[0].name)
def test_every_option_is_a_key(project, field_opt):
    """The keys come from the one table of options: each option field is accepted under its own name."""
    f, o = field_opt
    value = _sample(f.name, o)
    toml_value = json.dumps(value) if not isinstance(value, bool) else str(value).lower()
    plan = load_plan(_write(project, _model(0, f"{f.name} = {toml_value}")))
    job = plan.jobs[0]
    got = getattr(job.config if hasattr(job.config, f.name) else job.preprocess, f.name)
    assert got == (tuple(value) if isinstance(value, list) else value) or o.kind in ("path", "choice")


@pytest.mark.parametrize("text, message", [
    ("[[model]]\npath = 'models/m0.onnx'\ndata = 'data/d0.npz'\nkmni = 3\n",
     r"unknown key 'kmni' in \[\[model\]\] #1 of .*batch.toml \(did you mean 'kmin'\?\)"),
    ("[defaults]\nfliter = 0.2\n" + _model(0), r"unknown key 'fliter' in \[defaults\] of .*batch.toml"),
    ("[default]\nkmin = 2\n" + _model(0), "unknown key 'default' in .*batch.toml"),
    (_model(0, "kmin = 0"), r"\[\[model\]\] #1 \(models/m0.onnx\) of .*batch.toml: kmin=0 is invalid"),
    ("[defaults]\nkmax = 'big'\n" + _model(0), r"\[defaults\] of .*batch.toml: kmax='big' is invalid"),
    ("[defaults]\nkmin = 50\n" + _model(0, "kmax = 40"), r"#1 .*kmin=50 is invalid: allowed at most kmax"),
    (_model(0, "metric = 'top3'"), "metric='top3' is invalid: allowed top1 | top5 | agreement"),
    (_model(0, "min_cr = 0.5"), r"min_cr=0.5 in \[\[model\]\] #1 .* allowed a number >= 1"),
    (_model(0, "min_cr = true"), "min_cr=True .* is invalid"),
    (_model(0, "mean = 'abc'"), "mean"),
    ("[[model]]\npath = 'models/m0.onnx'\ndata = 3\n", r"data=3 in \[\[model\]\] #1 .* allowed a path"),
    ("[defaults]\noutput = 'x.onnx'\n" + _model(0), r"'output' in \[defaults\] .* set it in each \[\[model\]\]"),
    ("[[model]]\ndata = 'data/d0.npz'\n", r"\[\[model\]\] #1 of .*batch.toml has no path"),
    ("[[model]]\npath = 'models/m0.onnx'\n", "has no data: set data in it or in \\[defaults\\]"),
    ("[[model]]\npath = 'models/nope.onnx'\ndata = 'data/d0.npz'\n", "path '.*nope.onnx' in .* is not a file"),
    ("[[model]]\npath = 'models/m0.onnx'\ndata = 'data/nope.npz'\n", "data '.*nope.npz' in .* does not exist"),
    ("[defaults]\n", "lists no model"),
    ("model = 3\n", "must be an array of tables"),
    ("defaults = 3\n" + _model(0), "defaults in .* must be a table"),
    (_model(0) + "[[model]]\npath = 'models/m1.onnx'\ndata = 'data/d1.npz'\noutput = 'out/m0.onnx'\n",
     r"output .*m0.onnx' in \[\[model\]\] #2 .* also written by"),
    (_model(0, "report = 'out/m0.onnx'"), "also written by"),
    ("[[model]]\npath = 'models/m0.onnx'\ndata = 'data/d0.npz'\noutput = 'models/m1.onnx'\n" + _model(1),
     "is an input of the batch"),
    ("[[model]]\npath = 'models/m0.onnx'\ndata = 'data/d0.npz'\noutput = 'batch.toml'\n", "is an input"),
    ("kmin = = 3\n", r"batch.toml is not valid TOML: .*line 1"),
    ("[[model]]\npath = 'a\n", "is not valid TOML"),
])
def test_bad_files_are_refused_naming_key_and_file(project, text, message):
    path = _write(project, text)
    with pytest.raises(AxcnnError, match=message) as err:
        load_plan(path)
    assert "\n" not in str(err.value)
    r = _run(["batch", str(path)])
    assert r.exit_code == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert not (project / "out").exists()  # nothing started


def test_unreadable_file(tmp_path):
    with pytest.raises(AxcnnError, match="cannot read the batch file"):
        load_plan(tmp_path / "missing.toml")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(AxcnnError, match="not valid TOML"):
        load_plan(tmp_path / "bin.toml")


# -- gates -----------------------------------------------------------------------------------------------------

def _job(**kw) -> Job:
    base = dict(index=1, name="m", path=None, data=None, output=None, report=None, run_dir=None, output_name=None,
                config=CompressConfig(), preprocess=Preprocess(), min_cr=None)
    return Job(**{**base, **kw})


def test_gates_use_eq1_ratio_and_the_verification_loss_when_there_is_one():
    job = _job(min_cr=4.0, config=CompressConfig(max_loss=1.0))
    rep = {"compression_ratio": 4.0, "accuracy_loss_pp": 0.5}
    assert gates_of(job, rep) == (Gate("min_cr", 4.0, 4.0, True), Gate("max_loss", 1.0, 0.5, True))
    rep = {"compression_ratio": 3.9, "accuracy_loss_pp": 0.5,
           "evaluation": {"verification": {"accuracy_loss_pp": 1.25}}}
    assert [g.passed for g in gates_of(job, rep)] == [False, False]
    assert gates_of(job, rep)[1].value == 1.25
    assert gates_of(_job(), rep) == ()


# -- running -----------------------------------------------------------------------------------------------------

def test_batch_writes_models_summary_and_junit(project):
    path = _write(project, f"[defaults]\n{FAST}min_cr = 2\n" + _model(0) + _model(1, "min_cr = 100"))
    summary, junit = project / "s.json", project / "results" / "ci" / "j.xml"  # folders made as needed
    r = _run(["batch", str(path), "--summary", str(summary), "--junit", str(junit), "-q"])
    assert r.exit_code == 1, r.output
    assert "PASS  models/m0.onnx" in r.stdout and "FAIL  models/m1.onnx" in r.stdout
    assert "min_cr: compression ratio" in r.stdout and "2 models: 1 passed, 1 failed, 0 errors" in r.stdout
    for i in (0, 1):  # a broken gate still writes the model, for inspection
        onnx.checker.check_model(onnx.load(str(project / "out" / f"m{i}.onnx")))
        assert json.loads((project / "out" / f"m{i}.report.json").read_text())["compression_ratio"] > 2
    s = json.loads(summary.read_text())
    assert (s["passed"], s["failed"], s["error"], s["ok"]) == (1, 1, 0, False)
    assert [m["status"] for m in s["models"]] == ["passed", "failed"]
    assert s["models"][1]["gates"][0]["gate"] == "min_cr" and not s["models"][1]["gates"][0]["passed"]
    suite = ET.parse(junit).getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert suite.get("tests") == "2" and suite.get("failures") == "1" and suite.get("errors") == "0"
    assert [c.get("name") for c in cases] == ["models/m0.onnx", "models/m1.onnx"]
    assert cases[0].find("failure") is None and cases[1].find("failure").get("type") == "gate"


def test_a_crash_is_an_error_and_the_others_still_run(project):
    np.savez(project / "data" / "bad.npz", x=np.zeros((4, 1, 8, 8), np.float32), y=np.array([0, 1, 2, 99]))
    path = _write(project, f"[defaults]\n{FAST}" + _model(0).replace("d0.npz", "bad.npz") + _model(1))
    junit = project / "j.xml"
    r = _run(["batch", str(path), "--junit", str(junit), "-q"])
    assert r.exit_code == 1 and "ERROR models/m0.onnx" in r.stdout and "labels must lie" in r.stdout
    assert "PASS  models/m1.onnx" in r.stdout
    suite = ET.parse(junit).getroot().find("testsuite")
    assert (suite.get("errors"), suite.get("failures")) == ("1", "0")
    assert suite.findall("testcase")[0].find("error") is not None
    assert not (project / "out" / "m0.onnx").exists() and (project / "out" / "m1.onnx").exists()


def test_fail_fast_skips_the_rest(project):
    path = _write(project, f"[defaults]\n{FAST}min_cr = 100\n" + _model(0) + _model(1))
    junit = project / "j.xml"
    r = _run(["batch", str(path), "--junit", str(junit), "--fail-fast", "-q"])
    assert r.exit_code == 1 and "SKIP  models/m1.onnx" in r.stdout
    cases = ET.parse(junit).getroot().find("testsuite").findall("testcase")
    assert cases[0].find("failure") is not None and cases[1].find("skipped") is not None
    assert not (project / "out" / "m1.onnx").exists()


def test_budget_not_met_is_a_gate_failure(project, monkeypatch):
    def budget(*a, **k):
        raise BudgetNotMet("no model within --max-loss 0.1 (the best found loses 0.4 points)")

    monkeypatch.setattr("axcnn.api.compress", budget)
    plan = load_plan(_write(project, _model(0, "max_loss = 0.1")))
    (o,) = batch.run_plan(plan)
    assert o.status == "failed" and o.gates == (Gate("max_loss", 0.1, None, False),) and "0.4 points" in o.message
    assert 'type="gate"' in batch.junit_xml(plan, [o])


def test_results_paths_are_checked_before_work(project):
    path = _write(project, f"[defaults]\n{FAST}" + _model(0))
    (project / "file").write_text("")
    r = _run(["batch", str(path), "--junit", str(project / "file" / "j.xml")])
    assert r.exit_code == 1 and "the JUnit path" in r.stderr and "is a file, not a folder" in r.stderr
    r = _run(["batch", str(path), "--summary", str(project / "models")])
    assert r.exit_code == 2 and "is a directory" in r.stderr  # click's own check: a usage error
    r = _run(["batch", str(path), "--summary", str(project / "models" / "m0.onnx")])
    assert r.exit_code == 1 and "is a file of the batch" in r.stderr
    assert not (project / "out").exists()


def test_interrupted_batch_prints_the_command_that_resumes_it(project, monkeypatch):
    path = _write(project, f"[defaults]\n{FAST}" + _model(0) + _model(1))
    summary = project / "s.json"
    whole = _run(["batch", str(path), "-q"])
    assert whole.exit_code == 0
    expected = {i: (project / "out" / f"m{i}.onnx").read_bytes() for i in (0, 1)}
    for i in (0, 1):
        (project / "out" / f"m{i}.onnx").unlink()
        (project / "out" / f"m{i}.report.json").unlink()

    calls = {"n": 0}
    real = cli._Progress.__call__

    def ctrl_c(self, event, **info):
        if event == "candidate":
            calls["n"] += 1
            if calls["n"] == 13:  # in the second model
                raise KeyboardInterrupt
        return real(self, event, **info)

    monkeypatch.setattr(cli._Progress, "__call__", ctrl_c)
    r = _run(["batch", str(path), "--summary", str(summary)])
    assert r.exit_code == 130 and "Resume with:" in r.stderr
    assert json.loads(summary.read_text())["skipped"] == 1
    command = shlex.split(r.stderr.strip().splitlines()[-1])
    assert command[:2] == ["axcnn", "batch"] and "--resume" in command
    monkeypatch.setattr(cli._Progress, "__call__", real)
    again = _run([*command[1:], "-q"])
    assert again.exit_code == 0, again.output
    assert "resumed" in again.stdout
    for i in (0, 1):
        assert (project / "out" / f"m{i}.onnx").read_bytes() == expected[i]
    s = json.loads(summary.read_text())
    assert s["ok"] and s["models"][1]["candidates_resumed"] > 0


# -- real models -------------------------------------------------------------------------------------------------

@pytest.mark.realdata
def test_three_real_models_one_unmeetable_gate(tmp_path):
    """Three shared real models, one with a gate it cannot meet: exit 1, three testcases, exactly one failure, and
    the two others written."""
    from conftest import REALDATA

    man = realdata_manifest()
    lines = ["[defaults]", "kmin = 8", "kmax = 16", "filter = 0.15", "limit = 300", ""]
    names = ["mnist_cnn_baskov", "fashion_cnn_edwin19", "mnist_external_data"]
    for i, name in enumerate(names):
        m = man["models"][name]
        lines += ["[[model]]", f'path = "{REALDATA / m["file"]}"',
                  f'data = "{REALDATA / man["datasets"][m["dataset"]]["file"]}"',
                  f"scale = {m['scale']}", f"mean = {m['mean']}", f"std = {m['std']}", f'layout = "{m["layout"]}"',
                  f'output = "out/{name}.onnx"', f"min_cr = {1000 if i == 1 else 2}", ""]
    path = tmp_path / "real.toml"
    path.write_text("\n".join(lines))
    junit = tmp_path / "junit.xml"
    r = _run(["batch", str(path), "--junit", str(junit), "-q"])
    assert r.exit_code == 1, r.output
    suite = ET.parse(junit).getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) == 3 and suite.get("failures") == "1" and suite.get("errors") == "0"
    assert [c.find("failure") is not None for c in cases] == [False, True, False]
    for name in (names[0], names[2]):
        onnx.checker.check_model(onnx.load(str(tmp_path / "out" / f"{name}.onnx")))


def test_budget_mode_gate_reads_the_verification_loss(project):
    """max_loss is the budget option and the gate: the gate is judged on the held-out verification loss, and a
    budget the search cannot meet is a failure (with no model written), not an error."""
    path = _write(project, "[defaults]\nmin_weights = 16\n" + _model(0, "max_loss = 50.0")
                  + _model(1, "max_loss = 0.0\nholdout = 0.5"))
    junit = project / "j.xml"
    r = _run(["batch", str(path), "--junit", str(junit), "-q"])
    assert r.exit_code == 1 and "PASS  models/m0.onnx" in r.stdout and "FAIL  models/m1.onnx" in r.stdout
    rep = json.loads((project / "out" / "m0.report.json").read_text())
    loss = rep["evaluation"]["verification"]["accuracy_loss_pp"]
    (o,) = [o for o in batch.run_plan(load_plan(path), resume=True) if o.job.index == 1]
    assert o.gates == (Gate("max_loss", 50.0, loss, True),)
    cases = ET.parse(junit).getroot().find("testsuite").findall("testcase")
    assert cases[1].find("failure").get("type") == "gate" and cases[1].find("error") is None
    assert not (project / "out" / "m1.onnx").exists()
