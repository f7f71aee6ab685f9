"""Budget mode (--max-loss / --target-cr) end to end on tiny in-code models: the budget is met on held-out samples
or the run fails, the repair keeps weights shared, and --fold-bn keeps the network's function."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import tiny_cnn, tiny_data
from onnx import TensorProto, helper, numpy_helper

from axcnn import rewrite, score
from axcnn.api import compress
from axcnn.config import CompressConfig
from axcnn.errors import BudgetNotMet

BASE = {"kmin": 2, "kmax": 256, "min_weights": 16, "batch_size": 64, "calib": 64}


def _files(tmp_path, n=300, seed=0, noise=0.05):
    model = tiny_cnn(seed=seed)
    x, y = tiny_data(model, n=n, noise=noise)
    mp, dp = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(model, mp)
    np.savez(dp, x=x, y=y)
    return mp, dp, x, y


def _outputs(path_or_model, x):
    m = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(str(path_or_model))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_max_loss_is_met_on_the_held_out_samples(tmp_path):
    mp, dp, x, y = _files(tmp_path)
    out = tmp_path / "o.onnx"
    rep = compress(mp, dp, out, tmp_path / "r.json", CompressConfig(max_loss=5.0, **BASE)).report
    assert rep["mode"] == "budget" and rep["budget"]["met"] and rep["budget"]["max_loss_pp"] == 5.0
    ver = rep["evaluation"]["verification"]
    assert ver["samples"] == 90 and rep["evaluation"]["selection"]["samples"] == 210
    assert ver["accuracy_loss_pp"] <= 5.0 and ver["ci95_pp"][0] <= ver["accuracy_loss_pp"] <= ver["ci95_pp"][1]
    assert rep["accuracy_measured_on"] == "verification" and rep["accuracy_loss_pp"] == ver["accuracy_loss_pp"]
    # the figure is the written file's: recount it independently on the same held-out samples
    from axcnn.api import split
    from axcnn.data import Dataset

    _, held = split(Dataset(x, y), CompressConfig(max_loss=5.0, **BASE))
    dense = _outputs(mp, held.x).argmax(1) == held.y
    shared = _outputs(out, held.x).argmax(1) == held.y
    assert ver["accuracy_loss_pp"] == pytest.approx(100 * (dense.mean() - shared.mean()))
    # every layer is in the sensitivity table, and Eq. 1 counts the repair's scale floats
    table = rep["sensitivity"]["entries"]
    assert {e["layer"] for e in table} == {layer["name"] for layer in rep["layers"]}
    def eq1(layer):  # Eq. 1 of what is stored: one index per weight (per pair of weights for 2-D vectors, the
        # input-channel axis rounded up), every codebook's entries, and the repair's scale floats
        shape = layer["shape"]
        indices = layer["weights"]
        if layer["vector_dim"] == 2:
            axis = 1 if layer["op_type"] == "Conv" else 0
            indices = indices // shape[axis] * -(-shape[axis] // 2)
        return (indices * layer["index_bits"] + layer["codebooks"] * layer["k"] * layer["vector_dim"] * layer["bits"]
                + layer["extra_bits"])

    assert [layer["eq1_bits"] for layer in rep["layers"]] == [eq1(layer) for layer in rep["layers"]]
    assert rep["eq1_bits_after"] == sum(layer["eq1_bits"] for layer in rep["layers"])
    assert json.loads((tmp_path / "r.json").read_text())["budget"]["met"]


def test_repaired_layers_keep_shared_weights_and_scale_after_the_layer(tmp_path):
    mp, dp, x, _ = _files(tmp_path)
    out = tmp_path / "o.onnx"
    rep = compress(mp, dp, out, None, CompressConfig(max_loss=5.0, **BASE)).report
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    decoded = rewrite.decode(written)
    scaled = 0
    for layer in rep["layers"]:
        # still shared: at most K values per codebook (K pairs for 2-D vectors)
        assert len(np.unique(decoded[layer["name"]])) <= layer["k"] * layer["codebooks"] * layer["vector_dim"]
        if layer["repair"] and layer["repair"]["scale"]:
            scaled += 1
            muls = [n for n in written.graph.node if n.op_type == "Mul" and f"{layer['name']}.axcnn_scale" in n.input]
            assert len(muls) == 1
            assert layer["extra_bits"] == layer["shape"][0 if layer["op_type"] != "Gemm" else 0] * layer["bits"]
    assert scaled >= 1
    # the file computes what the search measured: the in-memory network with the same weights
    assert np.isfinite(_outputs(out, x[:10])).all()


def test_budget_never_reported_met_when_verification_says_otherwise(tmp_path, monkeypatch):
    mp, dp, _, _ = _files(tmp_path)
    out = tmp_path / "o.onnx"
    real = score.paired_loss

    def pessimist(ref, cand):
        r = real(ref, cand)
        return {**r, "accuracy_loss_pp": 50.0}

    monkeypatch.setattr(score, "paired_loss", pessimist)
    with pytest.raises(BudgetNotMet, match="not met on the .* held-out verification samples"):
        compress(mp, dp, out, tmp_path / "r.json", CompressConfig(max_loss=5.0, **BASE))
    assert not out.exists() and not (tmp_path / "r.json").exists()


def test_each_verification_is_reported_and_a_failed_one_steps_to_a_more_accurate_network(tmp_path, monkeypatch):
    mp, dp, _, _ = _files(tmp_path)
    real = score.paired_loss
    calls = []

    def first_fails(ref, cand):
        r = real(ref, cand)
        calls.append(r)
        return {**r, "accuracy_loss_pp": 50.0} if len(calls) == 1 else r

    monkeypatch.setattr(score, "paired_loss", first_fails)
    rep = compress(mp, dp, tmp_path / "o.onnx", None, CompressConfig(max_loss=20.0, **BASE)).report
    checks = rep["budget"]["verifications"]
    assert rep["budget"]["verification_checks"] == len(checks) >= 2
    assert checks[0]["verification_loss_pp"] == 50.0
    assert checks[1]["compression_ratio"] < checks[0]["compression_ratio"]
    # only the verification decides a step: the stepped-to network is scored on the selection samples once written
    assert checks[0]["selection_loss_pp"] is not None and checks[1]["selection_loss_pp"] is None
    assert rep["evaluation"]["selection"]["samples"] > 0
    assert checks[-1]["verification_loss_pp"] == rep["evaluation"]["verification"]["accuracy_loss_pp"] <= 20.0
    assert checks[-1]["compression_ratio"] == pytest.approx(rep["compression_ratio"])


def test_unreachable_budget_names_the_best_loss(tmp_path):
    mp, dp, _, _ = _files(tmp_path, noise=0.0)
    with pytest.raises(BudgetNotMet, match=r"the most accurate one found loses (more than )?[0-9.]+ pp"):
        compress(mp, dp, tmp_path / "o.onnx", None,
                 CompressConfig(max_loss=0.0, kmin=2, kmax=2, min_weights=16, calib=64, batch_size=64))
    assert not (tmp_path / "o.onnx").exists()


def test_target_cr_reaches_the_ratio(tmp_path):
    mp, dp, _, _ = _files(tmp_path)
    rep = compress(mp, dp, tmp_path / "o.onnx", None, CompressConfig(target_cr=6.0, **BASE)).report
    assert rep["mode"] == "budget" and rep["compression_ratio"] >= 6.0
    assert rep["evaluation"]["verification"]["samples"] > 0


def test_target_cr_out_of_reach(tmp_path):
    mp, dp, _, _ = _files(tmp_path)
    with pytest.raises(BudgetNotMet, match="reaches --target-cr 40"):
        compress(mp, dp, tmp_path / "o.onnx", None, CompressConfig(target_cr=40.0, **BASE))


def _bn_model(seed=0):
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (8, 1, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.2, (10, 8 * 8 * 8)).astype(np.float32)
    bn = [rng.uniform(0.5, 2, 8), rng.normal(0, 0.3, 8), rng.normal(0, 0.3, 8), rng.uniform(0.5, 2, 8)]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")] + [
        numpy_helper.from_array(a.astype(np.float32), n) for a, n in zip(bn, ["g", "b", "m", "v"], strict=True)]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"]),
             helper.make_node("Relu", ["n"], ["r"]), helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "w2"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_fold_bn_outputs_match_the_dense_model_with_folded_weights(tmp_path):
    """--fold-bn shares the weights the network actually multiplies by: the written model has no
    BatchNormalization, its Conv weight holds at most K values close to the FOLDED dense weight, and it computes
    exactly what the folded dense model computes with those shared weights put in."""
    from axcnn.fold import fold_bn

    model = _bn_model()
    x = np.random.default_rng(1).normal(0, 1, (64, 1, 8, 8)).astype(np.float32)
    y = _outputs(model, x).argmax(1)
    mp, dp, out = tmp_path / "bn.onnx", tmp_path / "d.npz", tmp_path / "o.onnx"
    onnx.save(model, mp)
    np.savez(dp, x=x, y=y)
    rep = compress(mp, dp, out, None, CompressConfig(fold_bn=True, kmin=16, kmax=32, filter=1.0,
                                                     min_weights=16)).report
    written = onnx.load(str(out))
    assert "BatchNormalization" not in [n.op_type for n in written.graph.node]
    decoded = rewrite.decode(written)
    folded, records = fold_bn(model)
    assert [r.weight for r in records] == ["w1"]
    w1_folded = numpy_helper.to_array(next(t for t in folded.graph.initializer if t.name == "w1"))
    k = next(layer["k"] for layer in rep["layers"] if layer["name"] == "w1")
    assert len(np.unique(decoded["w1"])) <= k
    assert np.abs(decoded["w1"] - w1_folded).max() < 0.1 * np.abs(w1_folded).max()
    for t in folded.graph.initializer:
        if t.name in decoded:
            t.CopyFrom(numpy_helper.from_array(decoded[t.name].astype(np.float32), t.name))
    np.testing.assert_allclose(_outputs(written, x), _outputs(folded, x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------- Pareto mode


def test_pareto_writes_a_front_of_non_dominated_points_and_the_picked_one(tmp_path):
    mp, dp, _, _ = _files(tmp_path)
    out, front_dir = tmp_path / "o.onnx", tmp_path / "front"
    rep = compress(mp, dp, out, None, CompressConfig(pareto=True, beam=6, pick="loss:5", front_dir=str(front_dir),
                                                     **BASE)).report
    assert rep["mode"] == "pareto"
    front = rep["front"]
    assert front and sum(p["chosen"] for p in front) == 1
    for p in front:  # mutually non-dominated
        assert not any(q is not p and q["accuracy_loss_pp"] <= p["accuracy_loss_pp"]
                       and q["compression_ratio"] >= p["compression_ratio"]
                       and (q["accuracy_loss_pp"], q["compression_ratio"]) != (p["accuracy_loss_pp"],
                                                                               p["compression_ratio"])
                       for q in front)
        assert p["measured_on"] == "selection" and p["samples"] == 210 and p["verification"]["samples"] == 90
    chosen = next(p for p in front if p["chosen"])
    assert chosen["accuracy_loss_pp"] <= 5.0
    assert max(p["compression_ratio"] for p in front if p["accuracy_loss_pp"] <= 5.0) == chosen["compression_ratio"]
    assert rep["compression_ratio"] == pytest.approx(chosen["compression_ratio"])
    listing = json.loads((front_dir / "front.json").read_text())
    assert len(listing) == len(front)
    for entry in listing:
        m = onnx.load(str(front_dir / entry["file"]))
        onnx.checker.check_model(m)
        assert rewrite.is_shared_model(m)


def test_pareto_pick_that_fits_no_point_fails_and_writes_nothing(tmp_path):
    mp, dp, _, _ = _files(tmp_path)
    out = tmp_path / "o.onnx"
    with pytest.raises(BudgetNotMet, match="--pick cr:500"):
        compress(mp, dp, out, None, CompressConfig(pareto=True, beam=3, pick="cr:500", **BASE))
    assert not out.exists()


def test_auto_granularity_lets_the_search_choose_per_layer(tmp_path):
    """--granularity auto offers one codebook, channel groups and 2-D vectors per layer; whatever is chosen is
    written as chosen, decodes exactly and is counted in Eq. 1."""
    mp, dp, x, _ = _files(tmp_path)
    out = tmp_path / "o.onnx"
    rep = compress(mp, dp, out, None, CompressConfig(max_loss=5.0, granularity="auto", group_size=2,
                                                     **BASE)).report
    kinds = {(e["granularity"], e["vector_dim"]) for e in rep["sensitivity"]["entries"]}
    assert {("layer", 1), ("channel", 1), ("layer", 2)} <= kinds
    written = onnx.load(str(out))
    records = {r["name"]: r for r in rewrite.shared_layers(written)}
    for layer in rep["layers"]:
        assert (records[layer["name"]]["granularity"], records[layer["name"]]["vector_dim"]) == (
            layer["granularity"], layer["vector_dim"])
    assert rep["evaluation"]["verification"]["accuracy_loss_pp"] <= 5.0


# a loose budget: on this tiny net, vectors of its 72-weight first layer cannot be near lossless (a codebook of more
# than 16 pairs would outweigh the layer, and the search offers no K that makes a layer bigger than dense)
@pytest.mark.parametrize("mode", [{"max_loss": 25.0}, {"pareto": True, "beam": 3}])
@pytest.mark.parametrize("sharing", [{"granularity": "channel", "group_size": 3}, {"granularity": "kernel"},
                                     {"vector_dim": 2}])
def test_budget_and_pareto_take_one_fixed_sharing_for_every_layer(tmp_path, mode, sharing):
    """A fixed granularity (or 2-D vectors) applies to every layer the search shares; the file decodes to what the
    report says and runs."""
    mp, dp, x, _ = _files(tmp_path)
    out = tmp_path / "o.onnx"
    rep = compress(mp, dp, out, None, CompressConfig(**mode, **sharing, **BASE)).report
    want = (sharing.get("granularity", "layer"), sharing.get("vector_dim", 1))
    # kernel granularity leaves the Gemm one codebook (rank 2: no kernels), and the table says so
    assert {(e["granularity"], e["vector_dim"]) for e in rep["sensitivity"]["entries"]} <= {want, ("layer", 1)}
    assert want in {(e["granularity"], e["vector_dim"]) for e in rep["sensitivity"]["entries"]}
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    records = {r["name"]: r for r in rewrite.shared_layers(written)}
    assert records
    for layer in rep["layers"]:
        # a layer that cannot take the sharing (kernel on a Gemm) keeps one codebook, and says why
        got = (records[layer["name"]]["granularity"], records[layer["name"]]["vector_dim"])
        assert got == (layer["granularity"], layer["vector_dim"])
        assert got == want or layer.get("granularity_note")
    assert np.isfinite(_outputs(out, x[:10])).all()


# ------------------------------------------------------------------------------------------------- journal


def test_budget_run_stopped_and_resumed_writes_the_same_bytes_and_rescores_nothing_journaled(tmp_path, monkeypatch):
    """The sensitivity entries and the networks measured are journaled as they land; a run interrupted during the
    search and resumed takes them from the journal and writes what an uninterrupted run writes."""
    from axcnn.search.sensitivity import Sensitivity

    mp, dp, _, _ = _files(tmp_path)
    cfg = CompressConfig(max_loss=5.0, **BASE)
    whole = compress(mp, dp, tmp_path / "whole.onnx", None, cfg, run_dir=tmp_path / "run_whole").report

    real = Sensitivity.assemble
    calls = {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Sensitivity, "assemble", flaky)
    out = tmp_path / "o.onnx"
    with pytest.raises(KeyboardInterrupt):
        compress(mp, dp, out, None, cfg, run_dir=tmp_path / "run")
    assert not out.exists() and (tmp_path / "run").is_dir()
    monkeypatch.setattr(Sensitivity, "assemble", real)
    resumed = compress(mp, dp, out, None, cfg, run_dir=tmp_path / "run", resume=True).report
    assert out.read_bytes() == (tmp_path / "whole.onnx").read_bytes()
    assert resumed["timing"]["candidates_resumed"] > 0
    assert resumed["timing"]["candidates_scored"] < whole["timing"]["candidates_scored"]
    assert [layer["k"] for layer in resumed["layers"]] == [layer["k"] for layer in whole["layers"]]


def test_pareto_points_scored_through_the_executor_map(tmp_path, monkeypatch):
    """Pareto mode scores its networks as independent tasks of the executor (Ray runs them remotely)."""
    from axcnn.executor import LocalExecutor

    seen = []
    real = LocalExecutor.map

    def spy(self, fn, items):
        items = list(items)
        seen.append(len(items))
        return real(self, fn, items)

    monkeypatch.setattr(LocalExecutor, "map", spy)
    mp, dp, _, _ = _files(tmp_path)
    rep = compress(mp, dp, tmp_path / "o.onnx", None, CompressConfig(pareto=True, beam=4, **BASE)).report
    assert rep["pareto"]["measured"] in seen  # the front's networks in one map
    assert len(seen) > 1  # and the table's entries, layer by layer


# ------------------------------------------------------------------------------------------------- the search


def _synthetic_front(n_points=200):
    """A front from 1e-3 to 1 nat, sizes falling as the proxy grows (index 0 = smallest network)."""
    from axcnn.allocate import Allocation

    proxies = np.geomspace(1.0, 1e-3, n_points)
    bits = np.linspace(1e5, 4e5, n_points).astype(int)
    return [Allocation((i,), int(b), float(p)) for i, (p, b) in enumerate(zip(proxies, bits, strict=True))]


def _evaluator(front, slope, n, ref, noise_rng=None):
    """Extra errors = slope * proxy samples (plus noise): the relation the search fits."""
    calls = []

    def evaluate(a, max_wrong):
        extra = slope * a.proxy * n + (noise_rng.normal(0, 8) if noise_rng is not None else 0.0)
        wrong = (n - ref) + max(int(round(extra)), -(n - ref))
        calls.append(a.choice[0])
        if max_wrong is not None and wrong > max_wrong:
            return None, None, score.Count(correct=n - max_wrong - 1, seen=n // 3, stopped=True)
        return None, {"index": a.choice[0]}, score.Count(correct=n - wrong, seen=n, stopped=False)

    return evaluate, calls


@pytest.mark.parametrize("budget", [0.25, 0.5, 1.0, 2.0])
def test_search_lands_on_the_budget_of_a_noiseless_front(budget):
    from axcnn.search.budget import MAX_EVALS, _search_front

    front, n, ref = _synthetic_front(), 5000, 4000
    evaluate, calls = _evaluator(front, 0.12, n, ref)  # 1 pp per 0.083 nat, as ResNet-20 measured
    allowed = (n - ref) + int(budget / 100 * n)
    j, _, _, c = _search_front(front, evaluate, allowed, n, ref, CompressConfig(max_loss=budget))
    assert n - c.correct <= allowed + 1
    # the next smaller network would be over the budget (within rounding of one error)
    assert j == 0 or 0.12 * front[j - 1].proxy * n >= allowed - (n - ref) - 1
    assert len(set(calls)) <= MAX_EVALS + 1


def test_search_pools_noisy_counts_and_stays_within_its_evaluations():
    from axcnn.search.budget import MAX_EVALS, _search_front

    front, n, ref = _synthetic_front(), 5000, 4000
    picked = []
    for seed in range(20):
        evaluate, calls = _evaluator(front, 0.12, n, ref, np.random.default_rng(seed))
        j, *_ = _search_front(front, evaluate, (n - ref) + 50, n, ref, CompressConfig(max_loss=1.0))
        picked.append(0.12 * front[j].proxy * 100)  # the true loss, pp, of the network chosen
        assert len(set(calls)) <= MAX_EVALS + 1
    # unbiased around the budget (1 pp), not the largest network whose own noisy count happened to pass
    assert 0.85 < np.median(picked) < 1.1 and max(picked) < 1.4


def test_search_far_over_budget_everywhere_names_the_best_loss():
    from axcnn.search.budget import _search_front

    front, n, ref = _synthetic_front(), 5000, 4000
    evaluate, _ = _evaluator(front, 500.0, n, ref)  # even the most accurate network loses 50 pp
    with pytest.raises(BudgetNotMet, match="the most accurate one found loses"):
        _search_front(front, evaluate, (n - ref) + 25, n, ref, CompressConfig(max_loss=0.5))
